"""Tile-knob A/B for one convolution (issue #12, ADR 0056): the layer built by Kiln's pipeline once per
``TileKnobs`` variant, every variant's conv kernel timed in interleaved rounds (1 thread, thread CPU time,
through the VM's instrument hook; every other round in reverse order), numerically compared with the
first variant (the default knobs).

Usage (PYTHONPATH as in the README; run under `nice`):
  bench/tiles.py LAYER [LAYER ...] [--variant fused_pixels=false] [--variant max_vectors=1,max_pixels=14]
                 [--target ml_c4] [--cold] [--control]
  LAYER = cin,cout,k,hw[,stride] as in bench/ukernel.py. ``--control`` builds the default a second time
and times it last: its ratio to the first is the noise floor of the run (on a shared host two builds of
the same kernel differ by up to 10%). ``--cold`` rewrites 64 MiB before each call, so the weights come
from DRAM as inside a model whose weights do not fit in cache (ResNet-50: 100 MB).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _ukernel() -> Any:
    spec = importlib.util.spec_from_file_location("kiln_bench_ukernel", Path(__file__).with_name("ukernel.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_knobs(text: str) -> Any:
    """``name=value,name=value`` -> TileKnobs (ints, ``true``/``false``, ``none``)."""
    from kiln_compiler.schedules.knobs import TileKnobs

    values: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, raw = item.partition("=")
        raw = raw.strip().lower()
        values[name.strip()] = {"none": None, "true": True, "false": False}[raw] if raw in ("none", "true", "false") \
            else int(raw)
    return dataclasses.replace(TileKnobs(), **values)


def build_vm(model: Any, target_name: str, knobs: Any) -> Any:
    """``model`` compiled by compile_relax with ``knobs`` in place of the default tile choices."""
    import tvm
    from kiln.catalog import TargetCatalog
    from kiln_compiler.pipeline import compile_relax
    from kiln_compiler.schedules import cpu
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    original = cpu.schedule_cpu_func
    cpu.schedule_cpu_func = lambda func, vector: cpu.default_schedule(func, vector, knobs).mod["main"]
    try:
        target = dict(TargetCatalog().device(target_name).tvm_target)
        executable = compile_relax(from_onnx(model, keep_params_in_input=False), target).executable
    finally:
        cpu.schedule_cpu_func = original
    return relax.VirtualMachine(executable, tvm.cpu())


def run_layer(spec: tuple[int, ...], target: str, variants: list[Any], rounds: int, repeat: int, evict: Any) -> None:
    import tvm

    cin, cout, k, hw, stride = spec
    model = _ukernel().conv_model(cin, cout, k, hw, stride)
    x = np.random.default_rng(1).random((1, cin, hw, hw)).astype("float32")
    args = [tvm.runtime.tensor(x)]
    vms = [build_vm(model, target, kn) for kn in variants]
    outs = []
    for vm in vms:
        got = vm["main"](*args)
        outs.append((got if hasattr(got, "numpy") else got[0]).numpy())
    for kn, out in zip(variants[1:], outs[1:], strict=True):
        np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-4, err_msg=str(kn))
    def conv_ms(vm: Any) -> float:
        return float(_ukernel().conv_kernel_ms(vm, args, repeat, evict))

    rows = []
    for r in range(rounds):  # every other round in reverse order: no variant always runs first
        order = list(range(len(vms)))[::-1 if r % 2 else 1]
        ms = {i: conv_ms(vms[i]) for i in order}
        rows.append([ms[i] for i in range(len(vms))])
    ho = (hw + 2 * (k // 2) - k) // stride + 1
    flops = 2.0 * cin * cout * k * k * ho * ho
    print(f"layer {cin}->{cout} {k}x{k} at {hw}x{hw} s{stride} ({flops / 1e9:.3f} GFLOP), {target}, 1 thread "
          f"cpu-time, {rounds} rounds x {repeat}{', caches evicted per call' if evict.evicting else ''}:")
    base = [r[0] for r in rows]
    for i, kn in enumerate(variants):
        col = [r[i] for r in rows]
        ratios = [c / b for c, b in zip(col, base, strict=True)]
        m = statistics.median(col)
        changed = {f.name: getattr(kn, f.name) for f in dataclasses.fields(kn)
                   if getattr(kn, f.name) != f.default} or "default"
        print(f"  {changed!s:40s} {m:7.3f} ms {flops / m / 1e6:6.3g} GFLOP/s  /default "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


class _Evict:
    def __init__(self, cold: bool) -> None:
        self.buffer = np.zeros(16 << 20 if cold else 0, "float32")
        self.evicting = cold

    def __call__(self) -> None:
        if self.evicting:
            self.buffer += 1.0


def main() -> None:
    from kiln_compiler.schedules.knobs import TileKnobs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--variant", action="append", default=[], help="knobs as name=value,... (TileKnobs fields)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--target", default="ml_c4")
    ap.add_argument("--cold", action="store_true", help="evict the caches before each timed call")
    ap.add_argument("--control", action="store_true", help="time a second build of the default last")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    variants = [TileKnobs(), *(parse_knobs(v) for v in args.variant), *([TileKnobs()] if args.control else [])]
    for layer in args.layers:
        spec = [int(v) for v in layer.split(",")]
        run_layer(tuple((*spec, 1)[:5]), args.target, variants, args.rounds, args.repeat, _Evict(args.cold))


if __name__ == "__main__":
    main()
