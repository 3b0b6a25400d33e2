"""`make bench`: Kiln (TVM) vs ONNX Runtime on the onnx package's light models.

Usage: .venv/bin/python bench/run.py [--quick] [--tune-minutes M] [--threads N]
(KILN_BENCH_QUICK=1 is the same as --quick). Writes bench/results/YYYY-MM-DD-<host>.{md,csv}
and a ratio-vs-tuning-minutes curve (CSV, and PNG when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_info() -> tuple[str, str]:
    """CPU model name and its SIMD flags (those kiln.isa knows)."""
    from kiln.isa import KNOWN_FEATURES

    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = " ".join(f for f in line.split(":", 1)[1].split() if f in KNOWN_FEATURES)
                break
    except OSError:
        pass
    return model, flags


def host_target() -> str:
    """The catalog target of the widest x86 ISA this CPU has (ml_c5: AVX-512, ml_c4: AVX2)."""
    _, flags = cpu_info()
    return "ml_c5" if "avx512f" in flags.split() else "ml_c4"


def git_revision() -> str:
    """The commit measured (with ``+changes`` when the work tree differs from it)."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def median_ms(fn, repeat: int) -> float:
    import numpy as np

    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", default=os.environ.get("KILN_BENCH_QUICK") == "1")
    ap.add_argument("--tune-minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--models", help="comma-separated models to measure untuned (default: all five)")
    ap.add_argument("--tune-models", help="comma-separated models to measure after tuning (default: all)")
    ap.add_argument("--curve-model", help="the model of the ratio-vs-tuning-minutes curve")
    ap.add_argument("--curve-points", help="comma-separated cumulative tuning minutes for the curve")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    revision = git_revision()  # the code measured: read before anything else can change it

    import kiln.runtime
    import numpy as np
    import onnx
    import onnxruntime as ort
    from kiln.catalog import TargetCatalog
    from kiln_compiler import CompilerOptions, compile_model
    from kiln_compiler.package import package
    from kiln_compiler.samples import MODELS, input_shapes, load_light_model
    from kiln_compiler.tuning import TuningDatabase

    names = ["squeezenet", "resnet50"] if args.quick else list(MODELS)
    if args.models:
        names = args.models.split(",")
    tune_minutes = args.tune_minutes if args.tune_minutes is not None else (2.0 if args.quick else 15.0)
    tuned_models = ["squeezenet"] if args.quick else names
    if args.tune_models is not None:
        tuned_models = [m for m in args.tune_models.split(",") if m]
    curve_model = args.curve_model or ("squeezenet" if args.quick else "resnet50")
    curve_points = [0.5, 1.0, 2.0] if args.quick else [1.0, 3.0, 7.0, 15.0]
    if args.curve_points:
        curve_points = [float(p) for p in args.curve_points.split(",")]
    if curve_model not in names:
        names.append(curve_model)
    target = TargetCatalog().device(host_target())
    rows, curve = [], []

    def measure(name: str, tuning_minutes: float, db_dir: str | None) -> dict[str, object]:
        model = load_light_model(name)
        shapes = input_shapes(model)
        x = np.random.default_rng(0).random(next(iter(shapes.values()))).astype("float32")
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {next(iter(shapes)): x}
        ort_ms = median_ms(lambda: sess.run(None, feed), args.repeat)
        tuned = tuning_minutes > 0 and db_dir is not None
        options = CompilerOptions.parse(f'{{"tuning": {{"minutes": {tuning_minutes}}}}}' if tuned else None, target)
        with tempfile.TemporaryDirectory() as work:
            model_dir = Path(work) / "model"
            model_dir.mkdir()
            onnx.save(model, str(model_dir / "model.onnx"))
            t0 = time.time()
            result = compile_model(model_dir, "ONNX", target, options, out_dir=Path(work) / "build",
                                   tuning_database=TuningDatabase(db_dir) if tuned else None,
                                   deadline=time.time() + tuning_minutes * 60 + 120 if tuned else None)
            compile_s = time.time() - t0
            compiled = kiln.runtime.load(package(result, target, Path(work) / "model.tar.gz", model_dir=model_dir).path)
            tvm_ms = median_ms(lambda: compiled.run(feed), args.repeat)
        row = {"model": name, "tuning_min": tuning_minutes, "compile_s": round(compile_s, 1),
               "kiln_ms": round(tvm_ms, 2), "ort_ms": round(ort_ms, 2), "ratio": round(tvm_ms / ort_ms, 2),
               **{k: v for k, v in result.tuning.items()}}
        print(row, flush=True)
        return row

    for name in names:
        rows.append(measure(name, 0.0, None))
    for name in tuned_models:
        with tempfile.TemporaryDirectory() as d:
            rows.append(measure(name, tune_minutes, d))
    with tempfile.TemporaryDirectory() as d:  # one database, growing: cumulative minutes
        spent = 0.0
        for m in curve_points:
            row = measure(curve_model, m - spent, d)
            spent = m
            curve.append({"model": curve_model, "tuning_min_total": m, "ratio": row["ratio"],
                          "kiln_ms": row["kiln_ms"], "ort_ms": row["ort_ms"]})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{dt.date.today().isoformat()}-{socket.gethostname()}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(f"{stem}-curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curve[0]))
        w.writeheader()
        w.writerows(curve)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot([0] + [c["tuning_min_total"] for c in curve], [rows[names.index(curve_model)]["ratio"]] +
                 [c["ratio"] for c in curve], marker="o")
        plt.axhline(1.0, linestyle="--")
        plt.xlabel("tuning minutes")
        plt.ylabel(f"{curve_model}: Kiln / ONNX Runtime latency")
        plt.savefig(f"{stem}-curve.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: curve written as CSV only")
    model_name, flags = cpu_info()
    lines = [f"# Kiln bench {dt.date.today().isoformat()} on {socket.gethostname()}", "",
             f"- code: {revision}",
             f"- CPU: {model_name}, {os.cpu_count()} logical cores; flags: {flags}",
             f"- threads: TVM_NUM_THREADS={args.threads}, ORT intra_op_num_threads={args.threads}; "
             f"target {target}; batch 1 fp32; median of {args.repeat} runs; quick={args.quick}", "",
             "| model | tuning (min) | compile (s) | Kiln (ms) | ORT (ms) | Kiln/ORT | tuned | reused | default |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tuning_min']} | {r['compile_s']} | {r['kiln_ms']} | {r['ort_ms']} | "
                     f"{r['ratio']} | {r['tuned']} | {r['reused']} | {r['default']} |")
    lines += ["", f"Ratio vs cumulative tuning minutes ({curve_model}):", "",
              "| minutes | Kiln (ms) | ORT (ms) | Kiln/ORT |", "|---|---|---|---|"]
    lines += [f"| {c['tuning_min_total']} | {c['kiln_ms']} | {c['ort_ms']} | {c['ratio']} |" for c in curve]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
