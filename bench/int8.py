"""Reduced-precision bench: Kiln int8 vs Kiln fp32 vs ONNX Runtime fp32 and int8 (the same QDQ model) vs OpenVINO.

Usage: .venv/bin/python bench/int8.py [--models squeezenet,...] [--threads 2] [--rounds 3] [--runs 20]
       [--target ml_c5] [--options '{"mcpu": "znver4"}'] [--quant-format QOperator]
The QDQ model is onnxruntime's ``quantize_static`` of the light model (per-channel s8 weights, u8
activations, kiln_compiler.samples.quantize_qdq); ``--quant-format QOperator`` quantizes to
QLinearConv & co. instead (kiln_compiler.samples.quantize_qoperator), run by Kiln and ONNX Runtime alike. Subjects run interleaved, round after round
(median of ``runs`` calls each), so load on a shared machine hits them alike; prints each subject's
median per round and the range over rounds. OpenVINO runs the fp32 model with its default precision
(bf16 on CPUs that have it), ``INFERENCE_NUM_THREADS`` = ``threads``. ``--cpu-time`` (with
``--threads 1``) times the calling thread's CPU time instead of wall time: on a shared host it leaves
out the time the thread waited for a core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_CLOCK = [time.perf_counter]


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = _CLOCK[0]()
        fn()
        times.append(_CLOCK[0]() - t)
    return float(np.median(times) * 1e3)


def _kiln(model_dir: Path, out: Path, target: str, options: str | None) -> Callable[[dict[str, np.ndarray]], object]:
    import kiln.runtime
    from kiln.catalog import TargetCatalog
    from kiln_compiler import CompilerOptions, compile_model
    from kiln_compiler.package import package

    tgt = TargetCatalog().device(target)
    result = compile_model(model_dir, "ONNX", tgt, CompilerOptions.parse(options, tgt), out_dir=out / "build")
    model = kiln.runtime.load(package(result, tgt, out / "model.tar.gz", model_dir=model_dir).path)
    return model.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="squeezenet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--target", default="ml_c5", help="catalog target the Kiln artifacts are built for")
    parser.add_argument("--options", default=None, help='CompilerOptions, e.g. \'{"mcpu": "znver4"}\' for VNNI')
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time (use with --threads 1)")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--quant-format", choices=("QDQ", "QOperator"), default="QDQ",
                        help="format of the int8 model both Kiln and ONNX Runtime run")
    args = parser.parse_args()
    if args.cpu_time:
        _CLOCK[0] = time.thread_time
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read by the TVM runtime at its first parallel call
    import onnx
    import onnxruntime as ort
    from kiln_compiler.samples import input_shapes, load_light_model, quantize_qdq, quantize_qoperator

    quantize = quantize_qoperator if args.quant_format == "QOperator" else quantize_qdq

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fp32 = load_light_model(name)
            qdq = quantize(fp32, work / "quantize")
            (input_name, shape), = input_shapes(fp32).items()
            x = {input_name: np.random.default_rng(0).standard_normal(shape).astype("float32")}
            subjects: dict[str, Callable[[], object]] = {}
            for label, model in (("fp32", fp32), ("int8", qdq)):
                d = work / label
                d.mkdir()
                onnx.save(model, str(d / "model.onnx"))
                run = _kiln(d, work / f"build-{label}", args.target, args.options)
                subjects[f"kiln {label}"] = lambda run=run, x=x: run(x)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                subjects[f"ort {label}"] = lambda sess=sess, x=x: sess.run(None, x)
            if not args.no_openvino:
                import openvino as ov

                compiled = ov.Core().compile_model(str(work / "fp32" / "model.onnx"), "CPU",
                                                   {"INFERENCE_NUM_THREADS": args.threads})
                request = compiled.create_infer_request()
                subjects["openvino default"] = lambda request=request, x=x: request.infer(x)
            rounds: dict[str, list[float]] = {k: [] for k in subjects}
            for _ in range(args.rounds):
                for label, fn in subjects.items():
                    rounds[label].append(_median_ms(fn, args.runs))
                    time.sleep(0.2)  # worker threads of the previous subject stop spinning
            for label, values in rounds.items():
                print(f"{name:12s} {label:10s} median {np.median(values):7.2f} ms  range "
                      f"{min(values):7.2f}-{max(values):7.2f}  rounds {', '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
