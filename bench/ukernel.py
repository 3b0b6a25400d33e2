"""Micro-kernel experiment (issue #12, ADR 0046): one NHWC convolution, Kiln's TVM kernel against a
hand-written AVX2 C micro-kernel (bench/ukernel/conv_ukernel_avx2.c), 1 thread, thread CPU time,
interleaved rounds, numerically compared.

Usage (PYTHONPATH as in the README; run under `nice`):
  bench/ukernel.py LAYER [LAYER ...] [--rounds 7] [--repeat 15] [--target ml_c4]
  LAYER = cin,cout,k,hw[,stride]   e.g. 2048,512,1,7  512,512,3,7  64,64,3,56
Prints per layer: the TVM conv kernel's median ms / GFLOP/s (its own kernel call only, timed through
the VM's instrument hook: the layout transposes at the graph's edges are left out) and each C tile
variant's, with the per-round ratio C / TVM.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = Path(__file__).with_name("ukernel") / "conv_ukernel_avx2.c"
# (name, mode, pixels): mode 0 = weights in registers (2 vectors), 1 = MLAS memory operands (4 vectors)
# 2 = mode 0 with the next channel tile's weights prefetched into L2
# 3 = mode 0 twice per pixel tile over 32-channel weight rows (AVX-512's weight access pattern)
VARIANTS = [("reg 2v x 6p", 0, 6), ("reg+pf 2v x 6p", 2, 6), ("reg x2 2v x 6p", 3, 6), ("reg 2v x 4p", 0, 4),
            ("mem 4v x 3p", 1, 3)]


def conv_model(cin: int, cout: int, k: int, hw: int, stride: int) -> Any:
    """An ONNX conv + bias + relu (ResNet's fused conv after batch-norm folding)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.05).astype("float32"), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype("float32"), "b")
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4,
                            strides=[stride] * 2)
    relu = helper.make_node("Relu", ["c"], ["y"])
    graph = helper.make_graph([conv, relu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               [1, cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def tvm_kernel(model: Any, target_name: str) -> Any:
    """The layer compiled by Kiln's pipeline (default schedules) as a VM."""
    import tvm
    from kiln.catalog import TargetCatalog
    from kiln_compiler.pipeline import compile_relax
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = dict(TargetCatalog().device(target_name).tvm_target)
    executable = compile_relax(from_onnx(model, keep_params_in_input=False), target).executable
    return relax.VirtualMachine(executable, tvm.cpu())


def c_library(work: Path, march: str = "haswell") -> Any:
    """The micro-kernel built by gcc for ``march`` into ``work`` (ukernel.so, and its assembly ukernel.s)."""
    lib = work / "ukernel.so"
    subprocess.run(["gcc", "-x", "c", "-std=gnu11", "-O3", f"-march={march}", "-fPIC", "-shared", str(SOURCE),
                    "-o", str(lib)], check=True)
    subprocess.run(["gcc", "-x", "c", "-std=gnu11", "-O3", f"-march={march}", "-S", str(SOURCE),
                    "-o", str(work / "ukernel.s")], check=True)
    so = ctypes.CDLL(str(lib))
    so.kiln_ukernel_conv_nhwc.restype = ctypes.c_int
    return so


def pack_weights(w: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW -> [K / lanes][R][S][C][lanes] (the tile's access order)."""
    k, c, r, s = w.shape
    return np.ascontiguousarray(w.reshape(k // lanes, lanes, c, r, s).transpose(0, 3, 4, 2, 1))


# --cold: written between timed calls, twice the host's L3 (32 MiB), so each call finds its weights in
# DRAM, as a layer does inside a model whose weights (ResNet-50: 100 MB) do not fit in cache
_EVICT = [np.zeros(0, "float32")]


def _evict() -> None:
    if _EVICT[0].size:
        _EVICT[0] += 1.0


def conv_kernel_ms(vm: Any, args: list[Any], repeat: int, evict: Callable[[], None]) -> float:
    """Median thread CPU time (ms) of ``vm``'s heaviest conv2d kernel over ``repeat`` calls of its main (one
    more call first, left out), ``evict`` run before each call: the kernel's own call, through the VM's
    instrument hook."""
    times: dict[str, list[float]] = {}
    start = [0.0]

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *a: Any) -> int:
        if before:
            start[0] = time.thread_time()
        else:
            times.setdefault(symbol, []).append(time.thread_time() - start[0])
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeat + 1):
        evict()
        vm["main"](*args)
    conv = max((s for s in times if "conv2d" in s), key=lambda s: sum(times[s]))
    return statistics.median(times[conv][1:]) * 1e3


def ukernel_conv(so: Any, x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride: int, mode: int, pixels: int,
                 channels_outer: bool = True) -> np.ndarray:
    """conv + bias + relu of ``x`` (C, H, W; padded by k // 2) with OIHW ``w`` through the C kernel:
    the output as H, W, K (NHWC without N)."""
    cout, cin, k, _ = w.shape
    pad = k // 2
    xp = np.ascontiguousarray(np.pad(x.transpose(1, 2, 0), ((pad, pad), (pad, pad), (0, 0))))
    ho = (x.shape[1] + 2 * pad - k) // stride + 1
    packed = pack_weights(w, 32 if mode in (1, 3) else 16)
    out = np.full((ho, ho, cout), np.nan, "float32")
    p = ctypes.c_void_p
    rc = so.kiln_ukernel_conv_nhwc(p(xp.ctypes.data), p(packed.ctypes.data), p(np.ascontiguousarray(bias).ctypes.data),
                                   p(out.ctypes.data), *[ctypes.c_int(v) for v in (
                                       ho, ho, cin, cout, k, k, stride, xp.shape[1], mode, pixels,
                                       int(channels_outer), 1)])
    if rc != 0:
        raise ValueError(f"the micro-kernel does not take {cin}->{cout} {k}x{k} in mode {mode} x {pixels} pixels")
    return out


def run_layer(spec: tuple[int, ...], target: str, rounds: int, repeat: int, so: Any) -> None:
    import tvm
    from onnx import numpy_helper

    cin, cout, k, hw, stride = spec
    model = conv_model(cin, cout, k, hw, stride)
    w = numpy_helper.to_array(model.graph.initializer[0])
    bias = np.ascontiguousarray(numpy_helper.to_array(model.graph.initializer[1]))
    x = np.random.default_rng(1).random((1, cin, hw, hw)).astype("float32")
    vm = tvm_kernel(model, target)
    args = [tvm.runtime.tensor(x)]
    want = vm["main"](*args)
    want = (want if hasattr(want, "numpy") else want[0]).numpy()[0].transpose(1, 2, 0)  # H W K
    ho = want.shape[0]
    pad = k // 2
    xp = np.ascontiguousarray(np.pad(x[0].transpose(1, 2, 0), ((pad, pad), (pad, pad), (0, 0))))
    wp_ = xp.shape[1]
    out = np.empty((ho, ho, cout), "float32")
    packs = {0: pack_weights(w, 16), 1: pack_weights(w, 32)}
    packs[2], packs[3] = packs[0], packs[1]

    def c_call(mode: int, pixels: int) -> Any:
        p = ctypes.c_void_p
        a = (p(xp.ctypes.data), p(packs[mode].ctypes.data), p(bias.ctypes.data), p(out.ctypes.data))
        dims = [ctypes.c_int(v) for v in (ho, ho, cin, cout, k, k, stride, wp_, mode, pixels)]
        weights_big = packs[mode].nbytes > xp.nbytes

        def call() -> None:
            rc = so.kiln_ukernel_conv_nhwc(*a, *dims, ctypes.c_int(int(weights_big)), ctypes.c_int(1))
            assert rc == 0, rc
        return call

    calls = [c_call(mode, pixels) for _, mode, pixels in VARIANTS]
    for name, mode, pixels in VARIANTS:
        got = ukernel_conv(so, x[0], w, bias, stride, mode, pixels)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)

    def tvm_ms() -> float:  # the TVM conv kernel's own call
        return conv_kernel_ms(vm, args, repeat, _evict)

    def c_ms(call: Any) -> float:
        call()
        ts = []
        for _ in range(repeat):
            _evict()
            xp.sum()  # the input warm, as the graph's transpose leaves it for TVM's kernel
            t = time.thread_time()
            call()
            ts.append(time.thread_time() - t)
        return statistics.median(ts) * 1e3

    rows = []
    for _ in range(rounds):
        rows.append([tvm_ms(), *(c_ms(c) for c in calls)])
    flops = 2.0 * cin * cout * k * k * ho * ho
    base = [r[0] for r in rows]
    med = statistics.median(base)
    print(f"layer {cin}->{cout} {k}x{k} at {hw}x{hw} s{stride} ({flops / 1e9:.3f} GFLOP), {target}, 1 thread cpu-time,"
          f" {rounds} rounds x {repeat}{', caches evicted per call' if _EVICT[0].size else ''}:")
    print(f"  TVM default     {med:7.3f} ms {flops / med / 1e6:6.1f} GFLOP/s")
    for i, (name, _, _) in enumerate(VARIANTS):
        col = [r[i + 1] for r in rows]
        ratios = [c / b for c, b in zip(col, base, strict=True)]
        m = statistics.median(col)
        print(f"  C {name:12s} {m:7.3f} ms {flops / m / 1e6:6.1f} GFLOP/s  C/TVM {statistics.median(ratios):.3f}"
              f" ({min(ratios):.3f}-{max(ratios):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--target", default="ml_c4")
    ap.add_argument("--march", default="haswell")
    ap.add_argument("--cold", action="store_true", help="evict the caches before each timed call")
    ap.add_argument("--keep", type=Path, default=None, help="keep the C library and its assembly here")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    if args.cold:
        _EVICT[0] = np.zeros(16 << 20, "float32")  # 64 MiB
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        so = c_library(work, args.march)
        for layer in args.layers:
            spec = [int(v) for v in layer.split(",")]
            run_layer((*spec, 1)[:5] if len(spec) == 4 else tuple(spec), args.target, args.rounds, args.repeat, so)


if __name__ == "__main__":
    main()
