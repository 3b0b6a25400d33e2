"""Tuning with 1 vs N local workers for the same budget (ADR 0023): kernels tuned, resulting latency.

Each configuration runs as a real job in local mode (moto, the state machine's Map state, real compiler
processes), each with a fresh tuning database, so no run reuses another's records. The artifacts are then
timed side by side in this process, round by round (the figures of one run on one host are comparable with
each other only).

    .venv/bin/python bench/tuning_fanout.py --model squeezenet --minutes 2 --workers 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _archive(model: str) -> tuple[bytes, str, list[int]]:
    proto = onnx.load(str(MODELS / f"light_{model}.onnx"))
    weights = {init.name for init in proto.graph.initializer}
    first = next(i for i in proto.graph.input if i.name not in weights)  # older models list weights as inputs
    shape = [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]
    buffer = io.BytesIO()
    data = proto.SerializeToString()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), first.name, shape


def run_job(model: str, minutes: float, workers: int, target: str, out: Path) -> dict[str, Any]:
    """One job in a fresh embedded stack; its record and the artifact's path."""
    from kiln.local.stack import EmbeddedStack

    archive, name, shape = _archive(model)
    with EmbeddedStack(max_active_jobs=4, max_compilers=max(2, workers + 1)) as stack:
        s3 = stack.client("s3")
        s3.put_object(Bucket="kiln-local-models", Key=f"{model}/model.tar.gz", Body=archive)
        job_name = f"{model}-w{workers}"
        options: dict[str, Any] = {"tuning": {"minutes": minutes, "workers": workers}}
        started = time.time()
        stack.kiln.service.create({
            "CompilationJobName": job_name, "RoleArn": stack.outputs["JobRoleArn"],
            "InputConfig": {"S3Uri": f"s3://kiln-local-models/{model}/model.tar.gz", "Framework": "ONNX",
                            "DataInputConfig": json.dumps({name: shape})},
            "OutputConfig": {"S3OutputLocation": f"s3://kiln-local-artifacts/{job_name}", "TargetDevice": target,
                             "CompilerOptions": json.dumps(options)},
            "StoppingCondition": {"MaxRuntimeInSeconds": int(minutes * 60 * 3 + 900)}})
        job = stack.wait_for(job_name, timeout=minutes * 60 * 4 + 1200)
        wall = time.time() - started
        if job["CompilationJobStatus"] != "COMPLETED":
            raise SystemExit(f"{job_name}: {job['CompilationJobStatus']} {job['FailureReason']}")
        bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"][len("s3://"):].split("/", 1)
        path = out / f"{job_name}.tar.gz"
        s3.download_file(bucket, key, str(path))
        with tarfile.open(path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    return {"workers": workers, "wall_s": round(wall, 1), "tuning": manifest["tuning"], "path": path,
            "input": (name, shape), "usage": job["Kiln"]["Usage"], "profile": job["Kiln"].get("Profile", {})}


def time_side_by_side(runs: list[dict[str, Any]], rounds: int = 30) -> dict[int, float]:
    """Median latency (ms) of each artifact, timed in interleaved rounds in this process."""
    from kiln import runtime

    models = {r["workers"]: runtime.load(r["path"]) for r in runs}
    name, shape = runs[0]["input"]
    feeds = {name: np.random.default_rng(0).standard_normal(shape).astype("float32")}
    times: dict[int, list[float]] = {w: [] for w in models}
    for model in models.values():
        for _ in range(3):
            model.run(feeds)
    for _ in range(rounds):
        for workers, model in models.items():
            start = time.perf_counter()
            model.run(feeds)
            times[workers].append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
    return {w: statistics.median(t) for w, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="squeezenet")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target", default="ml_c4")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: run one job, write its summary
    args = parser.parse_args()
    if args.one:  # one embedded stack per process (moto's backends are per process)
        run = run_job(args.model, args.minutes, args.workers[0], args.target, args.one.parent)
        args.one.write_text(json.dumps({**run, "path": str(run["path"])}))
        return
    with tempfile.TemporaryDirectory(prefix="kiln-fanout-") as tmp:
        runs = []
        for workers in args.workers:
            summary = Path(tmp) / f"w{workers}.json"
            subprocess.run([sys.executable, __file__, "--model", args.model, "--minutes", str(args.minutes),
                            "--workers", str(workers), "--target", args.target, "--one", str(summary)], check=True)
            runs.append({**json.loads(summary.read_text()), "path": None})
            runs[-1]["path"] = Path(json.loads(summary.read_text())["path"])
        medians = time_side_by_side(runs)
    print(f"{args.model} for {args.target}, {args.minutes} min tuning budget, host: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| workers | kernels tuned | reused | default | job wall (s) | task-seconds (build + workers) | "
          "profile median (ms) | side-by-side median (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        usage = r["usage"]
        task_s = sum(usage.get("TaskSecondsByRunner", {}).values()) or usage["TaskSeconds"]
        t = r["tuning"]
        print(f"| {r['workers']} | {t['tuned']} | {t['reused']} | {t['default']} | {r['wall_s']} | {task_s:.0f} | "
              f"{r['profile'].get('median_ms', float('nan')):.2f} | {medians[r['workers']]:.2f} |")
        for worker in usage.get("TuningWorkers", []):
            print(f"|   worker {worker['Shard']} | {worker.get('Tuned', '-')} of {worker.get('Kernels', '-')} | | | | "
                  f"{worker.get('TaskSeconds', '-')} | | |")


if __name__ == "__main__":
    main()
