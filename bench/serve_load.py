"""`make serve-load`: `kiln serve-model` under 1, 8 and 32 concurrent clients (a benchmark, not a test).

Usage: .venv/bin/python bench/serve_load.py [--models tiny squeezenet] [--requests N] [--clients 1 8 32]
Compiles each model for ml_c4 with `kiln compile`, starts `kiln serve-model` on 127.0.0.1, and sends
N requests per client count (application/x-npy in and out) from that many keep-alive connections.
Records requests/s, p50/p99 latency, errors, and the server's resident memory once loaded and after
each level. Clients and server share this machine's CPUs: figures are for comparing runs on the same
machine, not absolute capacity. Writes bench/results/YYYY-MM-DD-<host>-serve-load.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from run import cpu_info, git_revision  # noqa: E402  (bench/run.py: the same host and revision lines)


def model_archive(name: str, out: Path) -> tuple[Path, dict[str, list[int]]]:
    """A model.tar.gz of tests.conftest's tiny network or one of the onnx package's light models."""

    if name == "tiny":
        from tests.conftest import tiny_onnx_model

        model, shapes = tiny_onnx_model(), {"x": [1, 8]}
    else:
        from kiln_compiler.samples import input_shapes, load_light_model

        model = load_light_model(name)
        shapes = {k: list(v) for k, v in input_shapes(model).items()}
    path = out / f"{name}.tar.gz"
    data = model.SerializeToString()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path, shapes


def compile_artifact(archive: Path, shapes: dict[str, list[int]], out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(archive), "--framework", "ONNX",
                    "--target-device", "ml_c4", "--data-input-config", json.dumps(shapes), "--output-dir", str(out)],
                   check=True, capture_output=True, timeout=900)
    return out / f"{archive.name.removesuffix('.tar.gz')}-ml_c4.tar.gz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url + "/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("kiln serve-model did not become ready")


def load_level(port: int, body: bytes, clients: int, requests: int, max_seconds: float) -> dict[str, float]:
    """``requests`` POST /invocations split over ``clients`` keep-alive connections; stops at ``max_seconds``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        failed = 0
        while time.perf_counter() < deadline:
            with lock:
                if next(counter, None) is None:
                    break
            started = time.perf_counter()
            try:
                connection.request("POST", "/invocations", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - started)
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies) + errors[0], "errors": errors[0], "seconds": wall,
            "req_per_s": len(latencies) / wall if wall else 0.0,
            "p50_ms": statistics.median(ordered) * 1000 if ordered else 0.0,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000 if ordered else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "squeezenet"])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (0: the CPU quota)")
    parser.add_argument("--max-seconds", type=float, default=300, help="cap per client count")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import numpy as np

    revision = git_revision()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-serve-load-") as tmp:
        for name in args.models:
            archive, shapes = model_archive(name, Path(tmp))
            artifact = compile_artifact(archive, shapes, Path(tmp) / "out")
            (input_name, shape), = shapes.items()
            buffer = io.BytesIO()
            np.save(buffer, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
            port = free_port()
            process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve-model", str(artifact), "--port",
                                        str(port), "--threads", str(args.threads)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**os.environ, "KILN_SERVING_LOG_LEVEL": "warning"})
            try:
                wait_ready(f"http://127.0.0.1:{port}", process)
                loaded = rss_mib(process.pid)
                for clients in args.clients:
                    before = rss_mib(process.pid)
                    figures = load_level(port, buffer.getvalue(), clients, args.requests, args.max_seconds)
                    rows.append({"model": name, "input": f"{input_name} {shape}", "clients": clients,
                                 **{k: round(v, 2) for k, v in figures.items()},
                                 "rss_loaded_mib": round(loaded, 1), "rss_before_mib": round(before, 1),
                                 "rss_after_mib": round(rss_mib(process.pid), 1)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                process.terminate()
                process.wait(timeout=60)
    write_results(rows, args, revision)


def write_results(rows: list[dict[str, object]], args: argparse.Namespace, revision: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today().isoformat()}-{socket.gethostname().split('.')[0]}-serve-load"
    with open(f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model, flags = cpu_info()
    lines = [f"# kiln serve-model under load ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)", "",
             f"- CPU: {model} ({os.cpu_count()} CPUs; {flags})", f"- code: {revision}",
             f"- {args.requests} requests per client count, application/x-npy in and out, keep-alive connections; "
             "clients run on the same machine as the server", "",
             "| model | clients | requests | errors | req/s | p50 ms | p99 ms | RSS loaded MiB | RSS before MiB "
             "| RSS after MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['rss_loaded_mib']} | {r['rss_before_mib']} | "
                     f"{r['rss_after_mib']} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .csv")


if __name__ == "__main__":
    main()
