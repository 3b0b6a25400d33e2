"""bf16 bench: Kiln bf16 vs Kiln fp32 vs OpenVINO out of the box (bf16 on AVX512-BF16 CPUs) vs ONNX Runtime fp32.

Usage: .venv/bin/python bench/bf16.py [--models resnet50,squeezenet] [--threads 2] [--rounds 3] [--runs 20]
       [--target ml_c5] [--mcpu znver4]
Both Kiln artifacts are built for the same target and mcpu (one with ``"precision": "bf16"``), from the
light model with random weights (kiln_compiler.samples). Subjects run interleaved, round after round
(median of ``runs`` calls each), so load on a shared machine hits them alike; prints each subject's
median per round, the range over rounds, and the bf16 artifact's deviation from the fp32 one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _kiln(model_dir: Path, out: Path, target: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import kiln.runtime
    from kiln.catalog import TargetCatalog
    from kiln_compiler import CompilerOptions, compile_model
    from kiln_compiler.package import package

    tgt = TargetCatalog().device(target)
    result = compile_model(model_dir, "ONNX", tgt, CompilerOptions.parse(json.dumps(options), tgt),
                           out_dir=out / "build")
    artifact = package(result, tgt, out / "model.tar.gz", model_dir=model_dir)
    return kiln.runtime.load(artifact.path), artifact.manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,squeezenet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--target", default="ml_c5", help="catalog target the Kiln artifacts are built for")
    parser.add_argument("--mcpu", default="znver4", help="a CPU with AVX512-BF16 (znver4, sapphirerapids, ...)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read by the TVM runtime at its first parallel call
    import onnx
    import onnxruntime as ort
    import openvino as ov
    from kiln.benchmark import median_ms
    from kiln_compiler.samples import input_shapes, load_light_model

    core = ov.Core()
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = load_light_model(name, strip_softmax=True)
            (input_name, shape), = input_shapes(model).items()
            x = {input_name: np.random.default_rng(0).standard_normal(shape).astype("float32")}
            (work / "model").mkdir()
            onnx.save(model, str(work / "model" / "model.onnx"))
            subjects: dict[str, Callable[[], object]] = {}
            kiln_fp32, _ = _kiln(work / "model", work / "fp32", args.target, {"mcpu": args.mcpu})
            kiln_bf16, manifest = _kiln(work / "model", work / "bf16", args.target,
                                        {"mcpu": args.mcpu, "precision": "bf16"})
            subjects["kiln fp32"] = lambda run=kiln_fp32.run, x=x: run(x)
            subjects["kiln bf16"] = lambda run=kiln_bf16.run, x=x: run(x)
            compiled = core.compile_model(core.read_model(str(work / "model" / "model.onnx")), "CPU",
                                          {"INFERENCE_NUM_THREADS": args.threads})
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            ov_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
            request = compiled.create_infer_request()
            subjects[f"openvino default ({ov_precision})"] = lambda r=request, x=x: r.infer(x)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            subjects["ort fp32"] = lambda sess=sess, x=x: sess.run(None, x)
            rounds: dict[str, list[float]] = {k: [] for k in subjects}
            for _ in range(args.rounds):
                for label, fn in subjects.items():
                    rounds[label].append(median_ms(fn, args.runs))
                    time.sleep(0.2)  # worker threads of the previous subject stop spinning
            for label, values in rounds.items():
                print(f"{name:12s} {label:28s} median {np.median(values):7.2f} ms  range "
                      f"{min(values):7.2f}-{max(values):7.2f}  rounds {', '.join(f'{v:.2f}' for v in values)}")
            print(f"{name:12s} bf16 deviation from fp32 (manifest): {json.dumps(manifest.get('precision'))}")


if __name__ == "__main__":
    main()
