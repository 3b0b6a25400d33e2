"""Kernel work bench: build a light model's artifact, time artifacts against ONNX Runtime
interleaved in one process, and profile an artifact per kernel.

Usage (PYTHONPATH as in the README):
  bench/kernels.py build squeezenet ml_c4 out.so          # default schedules of this checkout
  bench/kernels.py time squeezenet a.so b.so [--rounds 5] # medians per round, a/b vs ORT, same run
                                       [--peer openvino]  # vs OpenVINO out of the box (bf16 here)
                                       [--peer openvino-fp32]  # the same on the fp32 model with --int8
  bench/kernels.py profile squeezenet a.so [--top 15]     # per-kernel ms and GFLOP/s (VM instrument)
  bench/kernels.py --threads 2 balance resnet50 ml_c4     # parallel loop extents, static 2-thread balance
  bench/kernels.py ortprofile squeezenet [--top 15]       # ONNX Runtime's own per-node profile
  bench/kernels.py build squeezenet ml_c5 bf16.so --precision bf16 --mcpu znver4  # (profile takes both too)
  bench/kernels.py --stem build resnet50 ml_c4 stem.so  # the model up to its first max pool (every subcommand)
  bench/kernels.py --int8 build squeezenet ml_c5 int8.so --mcpu znver4  # the QDQ model (quantize_qdq, as
                                                          # bench/int8.py); time/profile: ORT runs it too

A/B comparisons of two schedules: build one .so from each checkout, then time both in one run:
host noise (this machine is shared) hits every subject of a round alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

_QUANTIZE = [False]  # --int8: the QDQ model instead of the fp32 one
_STEM = [False]  # --stem: the model up to its first max pool (first conv, its epilogue, the pool)
_PARALLEL = ["kiln"]  # --parallel: the artifacts' parallel loops on Kiln's launcher or TVM's pool


def _model(name: str) -> tuple[Any, dict[str, tuple[int, ...]]]:
    import tempfile

    from kiln_compiler.samples import input_shapes, load_light_model, quantize_qdq

    model = load_light_model(name)
    shapes = input_shapes(model)
    if _STEM[0]:
        model = _stem(model)
    if _QUANTIZE[0]:
        with tempfile.TemporaryDirectory() as tmp:
            model = quantize_qdq(model, Path(tmp))
    return model, shapes


def _stem(model: Any) -> Any:
    """``model`` cut after its first MaxPool: the stem (3-channel conv, its batch norm and ReLU, the pool)
    that ``--stem`` builds, times and profiles on its own, against ONNX Runtime running the same cut."""
    import onnx.shape_inference
    import onnx.utils

    model = onnx.shape_inference.infer_shapes(model)  # the Extractor needs the cut's value_info
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return onnx.utils.Extractor(model).extract_model(inputs, [pool.output[0]])


def _tvm_target(target_name: str, mcpu: str | None) -> dict[str, Any]:
    from kiln.catalog import TargetCatalog

    target = dict(TargetCatalog().device(target_name).tvm_target)
    return {**target, "mcpu": mcpu} if mcpu else target


def build(name: str, target_name: str, out: Path, precision: str = "fp32", mcpu: str | None = None) -> None:
    """Compile ``name`` with the default schedules for the catalog target ``target_name``
    (``mcpu`` overriding the catalog's, as CompilerOptions do; ``precision`` as in compile_relax)."""
    from kiln_compiler.pipeline import compile_relax
    from tvm.relax.frontend.onnx import from_onnx

    model, shapes = _model(name)
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    t0 = time.time()
    compiled = compile_relax(mod, _tvm_target(target_name, mcpu), precision=precision)
    compiled.executable.export_library(str(out), fcompile=_fcompile_with_launcher(target_name, out.parent))
    print(f"{name} {target_name}: compiled in {time.time() - t0:.1f} s, unscheduled {compiled.unscheduled}")


def _fcompile_with_launcher(target_name: str, work_dir: Path) -> Any:
    """The catalog target's compiler driver linking Kiln's parallel launcher in, as a compile job's
    artifact has it (ADR 0032): without it kiln-runtime and ``time``/``profile`` fall back to TVM's pool."""
    from kiln.catalog import TargetCatalog
    from kiln_compiler.backends.tvm import parallel_object
    from tvm.support import cc

    toolchain = TargetCatalog().device(target_name).toolchain
    assert toolchain is not None, f"{target_name} has no toolchain in the catalog"
    return cc.cross_compiler(toolchain.cxx, options=["-pthread"],
                             add_files=[str(parallel_object(toolchain.cxx, work_dir))])


def _feed(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.random(v).astype("float32") for k, v in shapes.items()}


def _vm(path: str) -> Any:
    """The artifact's VM with its kernels' parallel loops on Kiln's launcher, as kiln-runtime runs it
    (ADR 0032; ``--parallel tvm`` keeps TVM's pool)."""
    import tvm
    from kiln_runtime.tvm_lib import use_kiln_parallel
    from tvm import relax

    module = tvm.runtime.load_module(path)
    if _PARALLEL[0] == "kiln":
        use_kiln_parallel(Path(path))
    return relax.VirtualMachine(module, tvm.cpu())


def _median_ms(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = _CLOCK[0]()
        fn()
        times.append((_CLOCK[0]() - t) * 1000)
    _MINIMA.append(min(times))
    return statistics.median(times)


# wall clock, or with --cpu-time and one thread the calling thread's CPU time: on a host other
# processes load, it leaves out the time the thread waited for a core
_CLOCK = [time.perf_counter]
_MINIMA: list[float] = []  # the fastest run of each _median_ms call (less sensitive to a busy host)


def _openvino(model: Any, threads: int) -> tuple[Any, str]:
    """OpenVINO's CPU plugin out of the box (the precision it picks: bf16 on AVX512-BF16 CPUs): its
    infer request and that precision. With one thread it infers on the calling thread (checked:
    process CPU time = thread CPU time), so ``--cpu-time`` measures it as it does Kiln."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads})
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return compiled.create_infer_request(), hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)


def time_artifacts(name: str, paths: list[str], rounds: int, repeat: int, threads: int,
                   peer: str = "ort") -> None:
    """Interleaved rounds: the peer (ORT, or OpenVINO out of the box), then each artifact, ``repeat``
    runs each; prints per-round medians and ratios to the peer. Errors are against ORT (fp32)."""
    import onnxruntime as ort
    import tvm

    model, shapes = _model(name)
    feed = _feed(shapes)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    args = [tvm.runtime.tensor(v) for v in feed.values()]
    vms = [_vm(p) for p in paths]
    want = sess.run(None, feed)[0]
    for p, vm in zip(paths, vms, strict=True):
        got = vm["main"](*args)
        got = (got if hasattr(got, "numpy") else got[0]).numpy()
        err = float(np.abs(got - want).max() / max(1e-12, float(np.abs(want).max())))
        print(f"{p}: max error vs ORT {err:.2e} of the output's scale")
    label, run_peer = "ORT", lambda: sess.run(None, feed)
    if peer in ("openvino", "openvino-fp32"):
        # openvino-fp32: out of the box on the fp32 model whatever --int8 says (the bar for int8 artifacts)
        from kiln_compiler.samples import load_light_model

        request, precision = _openvino(load_light_model(name) if peer == "openvino-fp32" else model, threads)
        label, run_peer = f"OpenVINO ({precision})", lambda: request.infer(feed)
    rows: list[list[float]] = []
    minima: list[list[float]] = []
    for _ in range(rounds):
        _MINIMA.clear()
        row = [_median_ms(run_peer, repeat)]
        time.sleep(0.2)  # let the peer's spinning workers settle
        for vm in vms:
            row.append(_median_ms(lambda vm=vm: vm["main"](*args), repeat))
            time.sleep(0.2)
        rows.append(row)
        minima.append(list(_MINIMA))
        print(f"round: {label} {row[0]:.2f} ms | " + " | ".join(f"{r:.2f} ms ({r / row[0]:.2f}x)" for r in row[1:]))
    for i, p in enumerate(paths):
        ratios = [r[i + 1] / r[0] for r in rows]
        print(f"{p}: median {statistics.median(r[i + 1] for r in rows):.2f} ms, ratio vs {label} median "
              f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
              f"{label} median {statistics.median(r[0] for r in rows):.2f} ms; fastest runs: "
              f"{min(m[i + 1] for m in minima):.2f} ms vs {label} {min(m[0] for m in minima):.2f} ms")


def _reduction_summary(func: Any) -> tuple[float, str]:
    """FLOPs (2 x multiply-adds) of a kernel's reduction blocks and its class (block, kernel, map)."""
    from kiln_compiler.schedules.tir import has_root, iter_extents, reduction_blocks
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    if not has_root(sch):
        return 0.0, "other"
    total, kind = 0.0, "elementwise"
    for blk in reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root"))):
        stmt = sch.get(blk)
        extents = iter_extents(stmt) or []
        total += 2.0 * float(np.prod(extents)) if extents else 0.0
        if len(extents) == 7:  # conv2d NHWC: n, h, w, c, kh, kw, ic
            kind = f"{stmt.name_hint} {extents[4]}x{extents[5]} at {extents[1]}x{extents[2]}"
        else:
            kind = stmt.name_hint
    return total, kind


def profile(name: str, path: str, target_name: str, runs: int, top: int, precision: str = "fp32",
            mcpu: str | None = None) -> None:
    """Per-kernel wall time through the VM's instrument hook (median over ``runs`` inferences).

    The hook's own Python callback is inside every timed call: kernel times carry it too, and the
    ``vm.builtin.*`` calls (~0.1 us of work) are mostly that cost; time the VM itself with ``perf``."""
    import tvm
    from kiln_compiler import pipeline
    from tvm.relax.frontend.onnx import from_onnx

    model, shapes = _model(name)
    feed = _feed(shapes)
    # FLOPs per kernel name, from the same graph rewrites and fusion the build ran
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    with tvm.target.Target(_tvm_target(target_name, mcpu)) as tgt:
        fused = pipeline._cpu_kernels(mod, tgt, True, precision)
    summary = {gv.name_hint: _reduction_summary(f) for gv, f in fused.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    vm = _vm(path)
    times: dict[str, list[float]] = {}
    start: list[float] = [0.0]

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            start[0] = _CLOCK[0]()
        else:
            times.setdefault(symbol, []).append((_CLOCK[0]() - start[0]) * 1000)
        return 0

    args = [tvm.runtime.tensor(v) for v in feed.values()]
    vm["main"](*args)
    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    # ms per inference of each kernel (a kernel can run several times per inference), and its calls
    per_call = {s: statistics.median(v) * len(v) / runs for s, v in times.items()}
    calls = {s: len(v) / runs for s, v in times.items()}
    total = sum(per_call.values())
    print(f"{path}: {total:.2f} ms in calls per inference, {sum(len(v) for v in times.values()) / runs:.0f} calls")
    classes: dict[str, list[float]] = {}
    for sym, ms in sorted(per_call.items(), key=lambda kv: -kv[1]):
        # the layout rewrite renames kernels: <name>1_prepacked (or <name>1) is <name> of the fused module
        base = sym.removesuffix("_prepacked")
        f, kind = summary.get(base) or summary.get(base.removesuffix("1")) or (0.0, "other")
        f *= calls[sym]
        acc = classes.setdefault(kind, [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + ms, acc[1] + f, acc[2] + 1
        if top > 0:
            top -= 1
            rate = f"{f / ms / 1e6:7.1f} GFLOP/s" if f else "      -"
            print(f"  {ms:7.3f} ms {rate}  {sym} ({kind})")
    print("per class:")
    for kind, (ms, f, n) in sorted(classes.items(), key=lambda kv: -kv[1][0]):
        rate = f"{f / ms / 1e6:7.1f} GFLOP/s" if f else "      -"
        print(f"  {ms:7.3f} ms {rate}  {kind} ({n} kernels)")


def _thread_makespan(extent: int, threads: int, chunks_per_thread: int = 4) -> int:
    """Iterations the busiest thread runs of a parallel loop of ``extent`` on Kiln's launcher (ADR 0032):
    TVM's code splits the loop into ``threads * chunks_per_thread`` static chunks of ceil(extent / chunks)
    iterations, and each thread claims the next chunk when it is free."""
    chunks = threads * chunks_per_thread
    step = -(-extent // chunks)
    load = [0] * threads
    for i in range(chunks):
        load[load.index(min(load))] += max(0, min(extent, (i + 1) * step) - min(extent, i * step))
    return max(load)


def balance(name: str, target_name: str, threads: int) -> None:
    """Static balance of every kernel's parallel loops at ``threads`` threads: the default schedules'
    loop extents, the busiest thread's share, and the FLOP-weighted time lost to imbalance."""
    import tvm
    from kiln_compiler import pipeline
    from kiln_compiler.schedules import DefaultCPUSchedule, target_vector_unit
    from kiln_compiler.schedules.tir import has_root
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import Schedule

    model, shapes = _model(name)
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    with tvm.target.Target(_tvm_target(target_name, None)) as tgt:
        fused = pipeline._cpu_kernels(mod, tgt, True)
        summary = {gv.name_hint: _reduction_summary(f) for gv, f in fused.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc)}
        scheduled = DefaultCPUSchedule(target_vector_unit(tgt))(fused)
    total, lost, launches = 0.0, 0.0, 0
    for gv, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = Schedule(func)
        extents: list[int] = []
        seen: set[int] = set()
        for blk in sch.get_child_blocks(sch.get_sblock("root")) if has_root(sch) else []:
            for loop in sch.get_loops(blk):
                stmt = sch.get(loop)
                if stmt.kind == tvm.tirx.ForKind.PARALLEL and id(stmt) not in seen:
                    seen.add(id(stmt))
                    extents.append(int(stmt.extent))
        flops, kind = summary.get(gv.name_hint, (0.0, "other"))
        shares = [e / (threads * _thread_makespan(e, threads)) for e in extents if e > 0]
        worst = min(shares, default=1.0 / threads)  # no parallel loop: one thread works
        total += flops
        lost += flops * (1 / worst - 1)
        launches += len(extents)
        if flops:
            print(f"  {flops / 1e6:8.1f} MFLOP  {kind:30s} parallel extents {extents}, balance {worst:.2f}")
    print(f"{name} {target_name}: {total / 1e9:.2f} GFLOP, {launches} parallel loops per inference; "
          f"time lost to imbalance at {threads} threads: {lost / max(total, 1.0) * 100:.1f}% (FLOP-weighted)")


def ort_profile(name: str, runs: int, threads: int, top: int) -> None:
    """ONNX Runtime's own per-node profile (SessionOptions.enable_profiling): ms per inference of each
    node kind and the top nodes, median over ``runs`` inferences after a warm-up."""
    import json
    import tempfile

    import onnxruntime as ort

    model, shapes = _model(name)
    feed = _feed(shapes)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    runs_ms: list[float] = []
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            node = ev["name"].removesuffix("_kernel_time")
            nodes.setdefault(node, []).append(ev["dur"] / 1000)
            kinds[node] = ev.get("args", {}).get("op_name", "?")
        elif ev.get("cat") == "Session" and ev["name"] == "model_run":
            runs_ms.append(ev["dur"] / 1000)
    per_node = {n: statistics.median(v[1:] or v) for n, v in nodes.items()}  # the first run is the warm-up
    print(f"ORT {name}: model_run median {statistics.median(runs_ms[1:]):.2f} ms, "
          f"{sum(per_node.values()):.2f} ms in {len(per_node)} nodes")
    for node, ms in sorted(per_node.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:7.3f} ms  {node} ({kinds[node]})")
    by_kind: dict[str, list[float]] = {}
    for node, ms in per_node.items():
        by_kind.setdefault(kinds[node], []).append(ms)
    print("per op type:")
    for kind, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(v):7.3f} ms  {kind} ({len(v)} nodes)")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("model")
    b.add_argument("target")
    b.add_argument("out", type=Path)
    t = sub.add_parser("time")
    t.add_argument("model")
    t.add_argument("paths", nargs="+")
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--repeat", type=int, default=20)
    t.add_argument("--peer", default="ort", choices=("ort", "openvino", "openvino-fp32"),
                   help="the reference runtime: ONNX Runtime fp32, or OpenVINO at its default precision "
                        "(openvino-fp32: on the fp32 model also with --int8)")
    p = sub.add_parser("profile")
    p.add_argument("model")
    p.add_argument("path")
    p.add_argument("target")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    bal = sub.add_parser("balance")
    bal.add_argument("model")
    bal.add_argument("target")
    o = sub.add_parser("ortprofile", help="ONNX Runtime's own per-node profile")
    o.add_argument("model")
    o.add_argument("--runs", type=int, default=20)
    o.add_argument("--top", type=int, default=15)
    for sp in (b, p):
        sp.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
        sp.add_argument("--mcpu", default=None, help="LLVM -mcpu overriding the catalog target's (znver4 for bf16)")
    for sp in (t, p):
        sp.add_argument("--cpu-time", action="store_true", help="time the calling thread's CPU (needs --threads 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="the QDQ model (quantize_static) instead of the fp32 one")
    ap.add_argument("--stem", action="store_true", help="the model up to its first MaxPool (its stem) only")
    ap.add_argument("--parallel", default="kiln", choices=("kiln", "tvm"),
                    help="the artifacts' parallel loops on Kiln's launcher (as kiln-runtime runs them) or TVM's pool")
    args = ap.parse_args()
    _QUANTIZE[0] = args.int8
    _STEM[0] = args.stem
    _PARALLEL[0] = args.parallel
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if getattr(args, "cpu_time", False):
        if args.threads != 1:
            ap.error("--cpu-time measures the calling thread only: use --threads 1")
        _CLOCK[0] = time.thread_time
    if args.cmd == "build":
        build(args.model, args.target, args.out, args.precision, args.mcpu)
    elif args.cmd == "time":
        time_artifacts(args.model, args.paths, args.rounds, args.repeat, args.threads, args.peer)
    elif args.cmd == "balance":
        balance(args.model, args.target, args.threads)
    elif args.cmd == "ortprofile":
        ort_profile(args.model, args.runs, args.threads, args.top)
    else:
        profile(args.model, args.path, args.target, args.runs, args.top, args.precision, args.mcpu)


if __name__ == "__main__":
    main()
