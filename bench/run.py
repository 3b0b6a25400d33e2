"""`make bench`: Kiln (TVM) vs its peers, ONNX Runtime and OpenVINO, on the onnx package's light models.

Usage: .venv/bin/python bench/run.py [--quick] [--tune-minutes M] [--threads N] [--targets host,ml_c4]
(KILN_BENCH_QUICK=1 is the same as --quick). Untuned, every model is compiled for the catalog target
matching this host (its widest ISA, kiln.host) and for the AVX2 target ml_c4; Kiln and both peers run
each in its own process and are timed in interleaved blocks (kiln.benchmark, the same code as
`make demo`, ADR 0031); each row gives Kiln / ORT, Kiln / OpenVINO and Kiln / faster peer. The host
target's rows are timed again with one core kept busy by another process (--no-busy-core skips it).
Reduced-precision rows: Kiln int8 and bf16 against ORT/OpenVINO int8 on the same QDQ model and
OpenVINO's default precision (--reduced-models). Tuned rows and the curve use the host's target.
Writes bench/results/YYYY-MM-DD-<host>.{md,csv}, -reduced.csv and a ratio-vs-tuning-minutes curve
(CSV, and PNG when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def peer_versions() -> str:
    """The peers' package versions, as measured."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("onnxruntime", "openvino"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} missing")
    return ", ".join(found)


def git_revision() -> str:
    """The commit measured (with ``+changes`` when the work tree differs from it)."""

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


@contextlib.contextmanager
def one_core_busy() -> Iterator[None]:
    """Another process spinning on one core (normal priority) for the duration: a co-located service."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def plot_curve(path: Path, model: str, untuned: dict[str, object], curve: list[dict[str, object]]) -> None:
    """The ratio-vs-tuning-minutes curve as a PNG, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: curve written as CSV only")
        return
    minutes = [0.0] + [float(str(c["tuning_min_total"])) for c in curve]
    ratios = [float(str(untuned["ratio_faster_peer"]))] + [float(str(c["ratio_faster_peer"])) for c in curve]
    plt.plot(minutes, ratios, marker="o")
    plt.axhline(1.0, linestyle="--")
    plt.xlabel("tuning minutes")
    plt.ylabel(f"{model}: Kiln / faster peer latency")
    plt.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", default=os.environ.get("KILN_BENCH_QUICK") == "1")
    ap.add_argument("--tune-minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--per-round", type=int, default=5, help="timed calls per runner per round")
    ap.add_argument("--models", help="comma-separated models to measure untuned (default: all five)")
    ap.add_argument("--tune-models", help="comma-separated models to measure after tuning (default: all)")
    ap.add_argument("--reduced-models", help="comma-separated models of the int8/bf16 rows (default: all; '' for none)")
    ap.add_argument("--curve-model", help="the model of the ratio-vs-tuning-minutes curve")
    ap.add_argument("--curve-points", help="comma-separated cumulative tuning minutes for the curve")
    ap.add_argument("--targets", default="host,ml_c4",
                    help="comma-separated catalog targets of the untuned rows ('host': the one matching this CPU)")
    ap.add_argument("--no-busy-core", dest="busy_core", action="store_false",
                    help="skip timing the host target's rows again with one core kept busy by another process")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    args = ap.parse_args()
    # Tuning measures candidates in this process, at the thread count the runners get (as the compiler's
    # entrypoint does for a job); each timed runner gets it in its own process's environment.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    revision = git_revision()  # the code measured: read before anything else can change it

    import numpy as np
    import onnx
    from kiln.benchmark import (
        RunnerSpec,
        faster_peer,
        kiln_runner,
        openvino_default_runner,
        peer_runners,
        runner_pool,
    )
    from kiln.catalog import Target, TargetCatalog
    from kiln.host import HOST, host_target, target_isa_label
    from kiln_compiler import CompilerOptions, compile_model
    from kiln_compiler.package import package
    from kiln_compiler.samples import MODELS, input_shapes, load_light_model, quantize_qdq
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
    if args.curve_points is not None:
        curve_points = [float(p) for p in args.curve_points.split(",") if p.strip()]
    reduced_models = names if args.reduced_models is None else [m for m in args.reduced_models.split(",") if m]
    if curve_points and curve_model not in names:
        names.append(curve_model)
    catalog = TargetCatalog()
    host = host_target(catalog)
    wanted = dict.fromkeys(host.name if t == HOST else t for t in args.targets.split(",") if t)  # ordered, unique
    targets = [catalog.device(t) for t in wanted]
    rows: list[dict[str, object]] = []
    curve: list[dict[str, object]] = []
    reduced: list[dict[str, object]] = []

    def measure(name: str, target: Target, tuning_minutes: float, db_dir: str | None,
                busy: bool = False) -> dict[str, object]:
        model = load_light_model(name)
        shapes = input_shapes(model)
        x = np.random.default_rng(0).random(next(iter(shapes.values()))).astype("float32")
        feed = {next(iter(shapes)): x}
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
            artifact = package(result, target, Path(work) / "model.tar.gz", model_dir=model_dir).path
            rivals = peer_runners(model_dir / "model.onnx", args.threads)
            with runner_pool([kiln_runner(artifact, args.threads), *rivals], feed) as pool:
                medians = pool.interleaved_medians(rounds=args.repeat, per_round=args.per_round)
                if busy:
                    with one_core_busy():
                        busy_medians = pool.interleaved_medians(rounds=args.repeat, per_round=args.per_round)
        peer, peer_ms = faster_peer(medians, [p.name for p in rivals])
        kiln_ms = medians["Kiln"]
        row = {"model": name, "target": target.name, "isa": target_isa_label(target),
               "tuning_min": tuning_minutes, "compile_s": round(compile_s, 1),
               "kiln_ms": round(kiln_ms, 2), "ort_ms": round(medians["ONNX Runtime"], 2),
               "openvino_ms": round(medians["OpenVINO"], 2), "ratio": round(kiln_ms / medians["ONNX Runtime"], 2),
               "ratio_openvino": round(kiln_ms / medians["OpenVINO"], 2),
               "ratio_faster_peer": round(kiln_ms / peer_ms, 2), "faster_peer": peer,
               **{k: v for k, v in result.tuning.items()}}
        if busy:
            _, busy_peer_ms = faster_peer(busy_medians, [p.name for p in rivals])
            row.update({"busy_kiln_ms": round(busy_medians["Kiln"], 2),
                        "busy_ort_ms": round(busy_medians["ONNX Runtime"], 2),
                        "busy_openvino_ms": round(busy_medians["OpenVINO"], 2),
                        "busy_ratio_faster_peer": round(busy_medians["Kiln"] / busy_peer_ms, 2)})
        print(row, flush=True)
        return row

    def measure_reduced(name: str) -> dict[str, object]:
        """Kiln int8 (the QDQ model) and bf16 against ORT and OpenVINO on the same QDQ model and OpenVINO's
        default precision, on this host's target with this CPU's mcpu (VNNI / AVX512-BF16 where it has them)."""
        import tvm

        mcpu = tvm.target.codegen.llvm_get_system_cpu()
        model = load_light_model(name)
        shapes = input_shapes(model)
        x = np.random.default_rng(0).random(next(iter(shapes.values()))).astype("float32")
        feed = {next(iter(shapes)): x}
        with tempfile.TemporaryDirectory() as work_dir:
            work = Path(work_dir)
            qdq = quantize_qdq(model, work / "quantize")
            specs, skipped = [], []
            for label, graph, extra in (("int8", qdq, {}), ("bf16", model, {"precision": "bf16"})):
                model_dir = work / label
                model_dir.mkdir()
                onnx.save(graph, str(model_dir / "model.onnx"))
                try:
                    options = CompilerOptions.parse(json.dumps({"mcpu": mcpu, **extra}), host)
                    result = compile_model(model_dir, "ONNX", host, options, out_dir=work / f"build-{label}")
                except Exception as exc:  # e.g. bf16 refused on a CPU without it: the row says so
                    skipped.append(f"{label}: {str(exc).splitlines()[0][:120]}")
                    continue
                artifact = package(result, host, work / f"{label}.tar.gz", model_dir=model_dir).path
                specs.append(kiln_runner(artifact, args.threads, f"Kiln {label}"))
            qdq_path, fp32_path = str(work / "int8" / "model.onnx"), work / "bf16" / "model.onnx"
            rivals = [RunnerSpec("ONNX Runtime int8", "onnxruntime", qdq_path, args.threads),
                      RunnerSpec("OpenVINO int8", "openvino", qdq_path, args.threads, precision="default"),
                      openvino_default_runner(fp32_path, args.threads)]
            with runner_pool([*specs, *rivals], feed, tolerate_failures=True) as pool:
                medians = pool.interleaved_medians(rounds=args.repeat, per_round=args.per_round)
                crashed = {name: reason.split(";")[0] for name, reason in pool.failed.items()}
        ours = {s.name: medians[s.name] for s in specs if s.name in medians}
        peer, peer_ms = faster_peer(medians, [r.name for r in rivals if r.name in medians])
        best = min(ours, key=lambda k: ours[k]) if ours else None
        row = {"model": name, "target": host.name, "mcpu": mcpu,
               **{f"{k.lower().replace(' ', '_')}_ms": round(v, 2) for k, v in medians.items()},
               **{f"{k.lower().replace(' ', '_')}_ms": "crashed" for k in crashed},
               "best_kiln": best or "-", "faster_peer": peer,
               "ratio_faster_peer": round(ours[best] / peer_ms, 2) if best else "-",
               "skipped": "; ".join(skipped + [f"{k}: {v}" for k, v in crashed.items()])}
        print(row, flush=True)
        return row

    def write_results() -> None:
        """The results files from the rows measured so far (rewritten after every row: a crash keeps them)."""
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{dt.date.today().isoformat()}-{socket.gethostname()}"
        with open(f"{stem}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
        if reduced:
            with open(f"{stem}-reduced.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=sorted({k for r in reduced for k in r}, key=str))
                w.writeheader()
                w.writerows(reduced)
        if curve:
            with open(f"{stem}-curve.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(curve[0]))
                w.writeheader()
                w.writerows(curve)
        if curve:
            plot_curve(Path(f"{stem}-curve.png"), curve_model, next(
                r for r in rows if r["model"] == curve_model and r["target"] == host.name and r["tuning_min"] == 0.0), curve)
        model_name, flags = cpu_info()
        described_targets = ", ".join(f"{t.name} ({t.tvm_target.get('mcpu')})" for t in targets)
        lines = [f"# Kiln bench {dt.date.today().isoformat()} on {socket.gethostname()}", "",
                 f"- code: {revision}",
                 f"- CPU: {model_name}, {os.cpu_count()} logical cores; flags: {flags}",
                 f"- threads: TVM_NUM_THREADS={args.threads}, ORT intra_op_num_threads={args.threads}, OpenVINO "
                 f"INFERENCE_NUM_THREADS={args.threads} (CPU plugin, INFERENCE_PRECISION_HINT=f32, "
                 f"PERFORMANCE_HINT=LATENCY); versions: {peer_versions()}",
                 f"- targets: {described_targets} untuned; tuned rows and curve on {host.name} (this host's widest ISA); "
                 f"batch 1 fp32; Kiln and each peer in its own process, timed in {args.repeat} interleaved rounds of "
                 f"{args.per_round} calls each (every runner idle before a block), medians; quick={args.quick}",
                 "",
                 "| model | target | tuning (min) | compile (s) | Kiln (ms) | ORT (ms) | OpenVINO (ms) | Kiln/ORT | "
                 "Kiln/OpenVINO | Kiln / faster peer | tuned | reused | default |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['target']} | {r['tuning_min']} | {r['compile_s']} | {r['kiln_ms']} | "
                         f"{r['ort_ms']} | {r['openvino_ms']} | {r['ratio']} | {r['ratio_openvino']} | "
                         f"**{r['ratio_faster_peer']}** ({r['faster_peer']}) | {r['tuned']} | {r['reused']} | "
                         f"{r['default']} |")
        busy = [r for r in rows if "busy_kiln_ms" in r]
        if busy:
            lines += ["", f"The same {host.name} artifacts and peers with one core kept busy by another process (a spinning "
                      "Python loop at normal priority), same pools, right after the rows above:", "",
                      "| model | Kiln (ms) | ORT (ms) | OpenVINO (ms) | Kiln / faster peer | Kiln busy / quiet |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['busy_kiln_ms']} | {r['busy_ort_ms']} | {r['busy_openvino_ms']} | "
                      f"**{r['busy_ratio_faster_peer']}** | {float(str(r['busy_kiln_ms'])) / float(str(r['kiln_ms'])):.2f} |"
                      for r in busy]
        lines += ["", "Geomean of Kiln / faster peer, untuned:", ""]
        for target in targets:
            ratios = [float(r["ratio_faster_peer"]) for r in rows if r["target"] == target.name and r["tuning_min"] == 0.0]
            if ratios:
                lines.append(f"- {target.name}: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f} "
                             f"over {len(ratios)} models")
        if reduced:
            lines += ["", f"Reduced precision on {host.name} with this CPU's mcpu ({reduced[0]['mcpu']}): Kiln int8 compiles "
                      "onnxruntime's quantize_static QDQ model (per-channel s8 weights, u8 activations), which ORT and "
                      "OpenVINO run too; Kiln bf16 compiles the fp32 model with {\"precision\": \"bf16\"}; OpenVINO "
                      "default runs the fp32 model at the precision it picks (bf16 on CPUs that have it). ms, medians:", "",
                      "| model | Kiln int8 | Kiln bf16 | ORT int8 | OpenVINO int8 | OpenVINO default | best Kiln / faster "
                      "peer | not built or crashed |", "|---|---|---|---|---|---|---|---|"]
            for r in reduced:
                lines.append(f"| {r['model']} | {r.get('kiln_int8_ms', '-')} | {r.get('kiln_bf16_ms', '-')} | "
                             f"{r.get('onnx_runtime_int8_ms', '-')} | {r.get('openvino_int8_ms', '-')} | "
                             f"{r.get('openvino_default_ms', '-')} | "
                             f"**{r['ratio_faster_peer']}** ({r['best_kiln']} vs {r['faster_peer']}) | "
                             f"{r['skipped'] or '-'} |")
        if curve:
            lines += ["", f"Ratio vs cumulative tuning minutes ({curve_model}, {host.name}):", "",
                      "| minutes | Kiln (ms) | ORT (ms) | OpenVINO (ms) | Kiln/ORT | Kiln / faster peer |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {c['tuning_min_total']} | {c['kiln_ms']} | {c['ort_ms']} | {c['openvino_ms']} | "
                      f"{c['ratio']} | {c['ratio_faster_peer']} |" for c in curve]
        Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {stem}.md")

    for target in targets:
        for name in names:
            rows.append(measure(name, target, 0.0, None, busy=args.busy_core and target == host))
            write_results()
    for name in reduced_models:
        reduced.append(measure_reduced(name))
        write_results()
    for name in tuned_models:
        with tempfile.TemporaryDirectory() as d:
            rows.append(measure(name, host, tune_minutes, d))
        write_results()
    with tempfile.TemporaryDirectory() as d:  # one database, growing: cumulative minutes
        spent = 0.0
        for m in curve_points:
            row = measure(curve_model, host, m - spent, d)
            spent = m
            curve.append({"model": curve_model, "tuning_min_total": m, "ratio": row["ratio"],
                          "ratio_faster_peer": row["ratio_faster_peer"], "kiln_ms": row["kiln_ms"],
                          "ort_ms": row["ort_ms"], "openvino_ms": row["openvino_ms"]})
            write_results()


if __name__ == "__main__":
    main()
