"""Quantize-by-calibration bench (ADR 0027): Kiln int8 by calibration vs Kiln fp32 vs ONNX Runtime int8 and fp32.

Usage: .venv/bin/python bench/calibration.py [--models squeezenet,resnet50] [--samples 8] [--rounds 5]
       [--runs 10] [--target ml_c5] [--mcpu znver4]
Both Kiln artifacts are built from the light model with random weights (kiln_compiler.samples) for the same
target and mcpu, one with ``{"quantize": {"dtype": "int8", "calibration": "calibration.npz"}}`` over
``samples`` standard-normal inputs. ONNX Runtime int8 runs the QDQ model Kiln made (the same one the int8
artifact was compiled from). One thread each, timed as the calling thread's CPU time (``time.thread_time``:
on a shared host it leaves out the time spent waiting for a core), subjects interleaved round after round,
median of ``runs`` calls per round. Prints each subject's median per round and the int8 artifact's recorded
deviation from the fp32 model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _kiln(model_dir: Path, out: Path, target: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any], float]:
    import kiln.runtime
    from kiln.catalog import TargetCatalog
    from kiln_compiler import CompilerOptions, compile_model
    from kiln_compiler.package import package

    tgt = TargetCatalog().device(target)
    started = time.monotonic()
    result = compile_model(model_dir, "ONNX", tgt, CompilerOptions.parse(json.dumps(options), tgt),
                           out_dir=out / "build")
    artifact = package(result, tgt, out / "model.tar.gz", model_dir=model_dir)
    return kiln.runtime.load(artifact.path), artifact.manifest, time.monotonic() - started


def _cpu_ms(run: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.thread_time()
        run()
        times.append((time.thread_time() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="squeezenet,resnet50")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--target", default="ml_c5")
    parser.add_argument("--mcpu", default="znver4", help="a CPU with AVX512-VNNI for the integer kernels")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"
    import onnx
    import onnxruntime as ort
    from kiln_compiler.samples import input_shapes, load_light_model

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = load_light_model(name, strip_softmax=True)
            (input_name, shape), = input_shapes(model).items()
            rng = np.random.default_rng(0)
            (work / "model").mkdir()
            onnx.save(model, str(work / "model" / "model.onnx"))
            np.savez(work / "model" / "calibration.npz",
                     **{input_name: rng.standard_normal((args.samples, *shape[1:])).astype("float32")})
            x = {input_name: rng.standard_normal(shape).astype("float32")}
            fp32, _, fp32_s = _kiln(work / "model", work / "fp32", args.target, {"mcpu": args.mcpu})
            int8, manifest, int8_s = _kiln(work / "model", work / "int8", args.target, {
                "mcpu": args.mcpu, "quantize": {"dtype": "int8", "calibration": "calibration.npz"}})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
            ort_fp32 = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            ort_int8 = ort.InferenceSession(str(work / "int8" / "quantize" / "qdq.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
            subjects: dict[str, Callable[[], object]] = {
                "kiln int8 (calibrated)": lambda m=int8, x=x: m.run(x),
                "kiln fp32": lambda m=fp32, x=x: m.run(x),
                "ort int8 (same QDQ)": lambda s=ort_int8, x=x: s.run(None, x),
                "ort fp32": lambda s=ort_fp32, x=x: s.run(None, x)}
            for run in subjects.values():
                run()
            rounds: dict[str, list[float]] = {k: [] for k in subjects}
            for index in range(args.rounds):
                names = list(subjects)
                shift = index % len(names)
                for subject in names[shift:] + names[:shift]:
                    rounds[subject].append(_cpu_ms(subjects[subject], args.runs))
            print(f"{name}: builds fp32 {fp32_s:.0f} s, int8 by calibration {int8_s:.0f} s "
                  f"({args.samples} samples)")
            for subject, times in rounds.items():
                print(f"  {subject:24s} median {statistics.median(times):8.2f} ms  "
                      f"rounds {', '.join(f'{t:.2f}' for t in times)}")
            print("  deviation from fp32:", json.dumps(manifest.get("precision")))


if __name__ == "__main__":
    main()
