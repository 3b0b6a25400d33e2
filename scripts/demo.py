"""`make demo`: compile a real model end to end in local mode, then run it and compare.

The same path as production: CreateCompilationJob validation, the Step Functions workflow on
moto, the compiler entrypoint as a process, the artifact downloaded from (embedded) S3."""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from kiln import runtime
from kiln_compiler.samples import input_shapes, load_light_model

MODEL = "squeezenet"


def main() -> int:
    out = Path("demo-out")
    out.mkdir(exist_ok=True)
    model = load_light_model(MODEL)
    shapes = input_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"{MODEL}.tar.gz"
        data = model.SerializeToString()
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("model.onnx")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        command = [sys.executable, "-m", "kiln.cli", "compile", str(archive), "--framework", "ONNX",
                   "--target-device", "ml_c4", "--data-input-config", json.dumps({k: list(v) for k, v in shapes.items()}),
                   "--output-dir", str(out), "--job-name", "demo-squeezenet"]
        print("$", " ".join(command[1:]), flush=True)
        if subprocess.call(command) != 0:
            return 1
    artifact = out / f"{MODEL}-ml_c4.tar.gz"
    compiled = runtime.load(artifact)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    ours = compiled.run(feeds)[0]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    theirs = session.run(None, feeds)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)

    def median_ms(run: object, repeat: int = 20) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()  # type: ignore[operator]
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    kiln_ms = median_ms(lambda: compiled.run(feeds))
    ort_ms = median_ms(lambda: session.run(None, feeds))
    print(f"\nartifact: {artifact}  inputs: {[(s.name, s.shape) for s in compiled.inputs]}")
    print(f"output matches ONNX Runtime (max abs diff {np.abs(ours - theirs).max():.2e})")
    print(f"median latency: Kiln {kiln_ms:.1f} ms, ONNX Runtime {ort_ms:.1f} ms (ratio {kiln_ms / ort_ms:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
