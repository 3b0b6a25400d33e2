"""CPU time one API call costs `kiln serve`, per process and per operation (a benchmark, not a test).

Starts `kiln serve` (as `make load` does), creates a few jobs (one compiles, the others wait as
STARTING: active jobs, as under `make load`), then makes CALLS sequential calls of each operation
from one client, in interleaved ROUNDS, and reads each process's CPU time (utime + stime) from
/proc/PID/stat before and after: the embedded stack's process (moto, Step Functions, the compiler
runner), the API workers together, and the client's own thread. CPU time, not wall time: robust to
other load on a shared host (a busy host slows a call, it does not make it cost more CPU).

Usage: .venv/bin/python bench/api_cpu.py [--calls 200] [--rounds 3] [--jobs 4] [--api-workers N] [--clients 1]
Prints a table (median over rounds of ms of CPU per call; the background CPU the processes use
with no call, measured per round, is printed beside it, not subtracted) and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load import ARTIFACTS, MODELS, ROLE, client, free_port, start_server, tar_gz, tiny_onnx_model, wait_ready  # noqa: E402

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """utime + stime of a process (all its threads), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def api_workers(serve_pid: int) -> list[int]:
    return [c for c in children(serve_pid)
            if b"kiln.local.api_workers" in Path(f"/proc/{c}/cmdline").read_bytes()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per operation per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients making the calls")
    parser.add_argument("--api-workers", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=4,
                        help="jobs created before the rounds (the issue's load lists 20; all but one wait as STARTING)")
    parser.add_argument("--idle", type=float, default=5, help="s per round with no call (background CPU)")
    parser.add_argument("--burst", type=int, default=0,
                        help="after the rounds, this many creates at once: the CPU until their workflows have all "
                             "asked for a compiler (the burst the issue's load starts with)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    port, aws_port = free_port(), free_port()
    url, aws_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{aws_port}"
    import boto3

    with tempfile.TemporaryDirectory(prefix="kiln-api-cpu-") as tmp:
        server = start_server(Path(tmp), port, aws_port, 1, args.api_workers)
        try:
            wait_ready(url)
            s3 = boto3.client("s3", endpoint_url=aws_url, region_name="us-east-1", aws_access_key_id="local",
                              aws_secret_access_key="local")
            s3.put_object(Bucket=MODELS, Key="cpu/model.tar.gz",
                          Body=tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
            api = client(url)
            names = [f"cpu-{i}" for i in range(args.jobs)]
            for name in names:
                api.create_compilation_job(
                    CompilationJobName=name, RoleArn=ROLE,
                    InputConfig={"S3Uri": f"s3://{MODELS}/cpu/model.tar.gz", "Framework": "ONNX",
                                 "DataInputConfig": '{"x": [1, 8]}'},
                    OutputConfig={"S3OutputLocation": f"s3://{ARTIFACTS}/cpu/{name}", "TargetDevice": "ml_c5"},
                    StoppingCondition={"MaxRuntimeInSeconds": 900})
            waiting = names[-1]  # --max-compilers 1: the last one waits (STARTING, an active job)
            operations: dict[str, Any] = {
                "DescribeCompilationJob": lambda api: api.describe_compilation_job(CompilationJobName=waiting),
                "ListCompilationJobs": lambda api: api.list_compilation_jobs(MaxResults=20, SortOrder="Descending"),
                "ListCompilationJobs(StatusEquals)": lambda api: api.list_compilation_jobs(
                    MaxResults=20, StatusEquals="INPROGRESS"),
            }
            workers = api_workers(server.pid)
            clients = [client(url) for _ in range(args.clients)]
            for api_ in clients:  # warm: imports, connections
                for call in operations.values():
                    call(api_)
            samples: dict[str, dict[str, list[float]]] = {op: {"stack": [], "workers": [], "client": [], "wall": []}
                                                           for op in operations}
            idle: dict[str, list[float]] = {"stack": [], "workers": []}  # CPU ms per s with no call
            for _ in range(args.rounds):
                stack0, workers0 = cpu_ms(server.pid), sum(cpu_ms(w) for w in workers)
                time.sleep(args.idle)
                idle["stack"].append((cpu_ms(server.pid) - stack0) / args.idle)
                idle["workers"].append((sum(cpu_ms(w) for w in workers) - workers0) / args.idle)
                for op, call in operations.items():
                    per_client = max(1, args.calls // args.clients)
                    client_cpu: list[float] = []

                    def run(api_: Any, call: Any = call, client_cpu: list[float] = client_cpu, per_client: int = per_client) -> None:
                        started = time.thread_time()
                        for _ in range(per_client):
                            call(api_)
                        client_cpu.append((time.thread_time() - started) * 1000)

                    stack0, workers0, wall0 = cpu_ms(server.pid), sum(cpu_ms(w) for w in workers), time.perf_counter()
                    threads = [threading.Thread(target=run, args=(api_,)) for api_ in clients]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    calls = per_client * len(clients)
                    wall = (time.perf_counter() - wall0) * 1000
                    samples[op]["stack"].append((cpu_ms(server.pid) - stack0) / calls)
                    samples[op]["workers"].append((sum(cpu_ms(w) for w in workers) - workers0) / calls)
                    samples[op]["client"].append(sum(client_cpu) / calls)
                    samples[op]["wall"].append(wall / calls)
            statuses = {n: api.describe_compilation_job(CompilationJobName=n)["CompilationJobStatus"] for n in names}
            burst = create_burst(api, clients[0] if clients else api, url, server.pid, workers, args.burst,
                                 statistics.median(idle["stack"]) if idle["stack"] else 0.0) if args.burst else {}
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = {"calls_per_round": args.calls, "rounds": args.rounds, "clients": args.clients,
              "api_workers": args.api_workers, "load_average": os.getloadavg(), "job_statuses_at_end": statuses,
              "ms_cpu_per_call_median": {op: {k: round(statistics.median(v), 2) for k, v in s.items()}
                                         for op, s in samples.items()},
              "idle_cpu_ms_per_s_median": {k: round(statistics.median(v), 1) for k, v in idle.items()},
              "samples": samples, "idle_samples": idle, "burst": burst}
    print(f"load average {os.getloadavg()}; statuses {statuses}")
    print(f"background CPU with no call: {result['idle_cpu_ms_per_s_median']} ms per s")
    print(f"{'operation':36} {'stack':>7} {'workers':>8} {'client':>7} {'wall':>7}  (ms per call, median of rounds)")
    for op, values in result["ms_cpu_per_call_median"].items():
        print(f"{op:36} {values['stack']:7.2f} {values['workers']:8.2f} {values['client']:7.2f} {values['wall']:7.2f}")
    if burst:
        print(f"burst of {burst['creates']} creates ({burst['accepted']} accepted): stack {burst['stack_cpu_ms']} ms "
              f"CPU ({burst['stack_cpu_ms_less_background']} less its background), workers {burst['workers_cpu_ms']} ms, "
              f"all asked for a compiler after {burst['seconds']} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def create_burst(api: Any, poller: Any, url: str, serve_pid: int, workers: list[int], count: int,
                 background_ms_per_s: float) -> dict[str, Any]:
    """``count`` creates at once (one client each); CPU of the stack and the API workers from the first
    create until every accepted job is INPROGRESS (its workflow ran to the compiler's start) plus 2 s."""
    accepted: list[str] = []
    lock = threading.Lock()
    burst_clients = [client(url) for _ in range(count)]

    def create(index: int) -> None:
        name = f"burst-{index:03d}"
        try:
            burst_clients[index].create_compilation_job(
                CompilationJobName=name, RoleArn=ROLE,
                InputConfig={"S3Uri": f"s3://{MODELS}/cpu/model.tar.gz", "Framework": "ONNX",
                             "DataInputConfig": '{"x": [1, 8]}'},
                OutputConfig={"S3OutputLocation": f"s3://{ARTIFACTS}/cpu/{name}", "TargetDevice": "ml_c5"},
                StoppingCondition={"MaxRuntimeInSeconds": 900})
        except ClientError:  # refused at the active-job limit: not one of the burst's jobs
            return
        with lock:
            accepted.append(name)

    stack0, workers0, wall0 = cpu_ms(serve_pid), sum(cpu_ms(w) for w in workers), time.perf_counter()
    threads = [threading.Thread(target=create, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    polls = 0
    while time.perf_counter() - wall0 < 120:
        polls += 1
        if all(poller.describe_compilation_job(CompilationJobName=n)["CompilationJobStatus"] != "STARTING"
               for n in accepted):
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - wall0
    time.sleep(2)  # the last ones' RunTask, after their MarkInProgress
    elapsed = time.perf_counter() - wall0
    stack = cpu_ms(serve_pid) - stack0
    return {"creates": count, "accepted": len(accepted), "seconds": round(seconds, 1), "polls": polls,
            "stack_cpu_ms": round(stack), "stack_cpu_ms_less_background": round(stack - background_ms_per_s * elapsed),
            "workers_cpu_ms": round(sum(cpu_ms(w) for w in workers) - workers0)}


if __name__ == "__main__":
    sys.exit(main())
