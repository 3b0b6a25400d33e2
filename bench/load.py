"""`make load`: Kiln's API under load, against `kiln serve` on 127.0.0.1 (a benchmark, not a test).

Phase 1: CLIENTS concurrent clients make CREATES CreateCompilationJob attempts (a tiny real ONNX
model) and, between them and until every accepted job is terminal, DescribeCompilationJob and
ListCompilationJobs calls. Reports errors other than the intended ResourceLimitExceeded, whether
every accepted job ended terminal, and API latency p50/p99 per operation.

Phase 2: ListCompilationJobs latency with 100, 1,000 and 10,000 jobs in the table. The rows are
inserted through Kiln's JobStore straight into the embedded DynamoDB (creating 10,000 real jobs
would run 10,000 compilations); the listing goes through `kiln serve`.

Usage: .venv/bin/python bench/load.py [--clients 50] [--creates 500] [--sizes 100,1000,10000]
Writes bench/results/YYYY-MM-DD-load.{json,md}. Bounded: the clients stop after --deadline s; jobs not
yet finished then are waited for (no API load) until all are, or none finished for --stall s (a stall).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from tests.conftest import tar_gz, tiny_onnx_model  # noqa: E402  (the tests' tiny real model)

ROLE = "arn:aws:iam::123456789012:role/kiln-compilation-job"
MODELS, ARTIFACTS = "kiln-local-models", "kiln-local-artifacts"
TERMINAL = ("COMPLETED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_model() -> str:
    """The host CPU's model name (Linux), for the results file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def compilers_running(server_pid: int) -> int:
    """Compiler processes `kiln serve` (``server_pid``) runs now (its children running kiln_compiler)."""
    count = 0
    with contextlib.suppress(OSError):  # the server or a child ended meanwhile
        for task in Path(f"/proc/{server_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    count += b"kiln_compiler" in Path(f"/proc/{child}/cmdline").read_bytes()
    return count


class LoadAverage:
    """The host's 1-minute load average, sampled every ``interval`` s while running (other processes
    share the host: the figure says how busy it was), and with ``compilers`` the compiler processes
    running (all slots busy while jobs wait: the run is bounded by compile throughput, not stalled)."""

    def __init__(self, interval: float = 5, compilers: Any = None) -> None:
        self.samples: list[float] = []
        self.compilers: list[int] = []
        self._count_compilers = compilers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            if self._count_compilers is not None:
                self.compilers.append(self._count_compilers())
            self._stop.wait(interval)

    def __enter__(self) -> LoadAverage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, float]:
        values = self.samples or [os.getloadavg()[0]]
        summary: dict[str, Any] = {"min": round(min(values), 1), "mean": round(sum(values) / len(values), 1),
                                   "max": round(max(values), 1)}
        if self.compilers:
            summary["compilers_running"] = {"min": min(self.compilers), "max": max(self.compilers),
                                            "mean": round(sum(self.compilers) / len(self.compilers), 2),
                                            "samples": len(self.compilers)}
        return summary


class Recorder:
    """Latency and outcome of every API call, by operation (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcomes: Counter[str] = Counter()
        self.messages: dict[str, str] = {}
        self.timeline: list[tuple[float, float]] = []  # (start, latency ms) of every call, for the per-minute tail

    def call(self, operation: str, fn: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = fn(**kwargs)
            outcome = "ok"
        except ClientError as exc:
            result, outcome = None, exc.response["Error"]["Code"]
            with self.lock:  # the first message of each kind of error, to say what it was
                self.messages.setdefault(f"{operation}:{outcome}", exc.response["Error"].get("Message", ""))
        except Exception as exc:  # a transport error is an error too
            result, outcome = None, type(exc).__name__
        elapsed = (time.perf_counter() - started) * 1000
        with self.lock:
            self.latency[operation].append(elapsed)
            self.timeline.append((started, elapsed))
            self.outcomes[f"{operation}:{outcome}"] += 1
        return result

    def by_minute(self) -> list[dict[str, float]]:
        """Calls, p50 and p99 per minute of the run (is the tail the create burst, or all along?)."""
        if not self.timeline:
            return []
        first = min(t for t, _ in self.timeline)
        minutes: dict[int, list[float]] = defaultdict(list)
        for t, ms in self.timeline:
            minutes[int((t - first) // 60)].append(ms)
        return [{"minute": m, "calls": len(v), "p50_ms": round(percentile(v, 50), 1),
                 "p99_ms": round(percentile(v, 99), 1)} for m, v in sorted(minutes.items())]

    def after(self, since: float) -> dict[str, float]:
        """Calls, p50 and p99 of the calls started after ``since`` (perf_counter): past the create burst."""
        later = [ms for t, ms in self.timeline if t >= since]
        return {"calls": len(later), "p50_ms": round(percentile(later, 50), 1), "p99_ms": round(percentile(later, 99), 1)}

    def summary(self) -> dict[str, Any]:
        everything = [v for values in self.latency.values() for v in values]
        return {
            "calls": len(everything),
            "p50_ms": round(percentile(everything, 50), 1), "p99_ms": round(percentile(everything, 99), 1),
            "by_operation": {op: {"calls": len(v), "p50_ms": round(percentile(v, 50), 1),
                                  "p99_ms": round(percentile(v, 99), 1), "max_ms": round(max(v), 1)}
                             for op, v in sorted(self.latency.items())},
            "by_minute": self.by_minute(),
            "outcomes": dict(sorted(self.outcomes.items())),
            "first_messages": dict(sorted(self.messages.items())),
        }


def start_server(work: Path, port: int, aws_port: int, max_compilers: int | None,
                 api_workers: int | None, compiler_niceness: int | None = None,
                 compiler_cpu_share: str | None = None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "kiln.cli", "serve", "--port", str(port), "--aws-port", str(aws_port),
               "--work-dir", str(work)]
    if max_compilers:
        command += ["--max-compilers", str(max_compilers)]
    if api_workers is not None:
        command += ["--api-workers", str(api_workers)]
    if compiler_niceness is not None:
        command += ["--compiler-niceness", str(compiler_niceness)]
    if compiler_cpu_share is not None:
        command += ["--compiler-cpu-share", compiler_cpu_share]
    log = open(work / "serve.log", "wb")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def client(url: str) -> Any:
    return boto3.client("sagemaker", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                        aws_secret_access_key="bench",
                        config=botocore.config.Config(retries={"max_attempts": 1}, max_pool_connections=4,
                                                      read_timeout=120))


def wait_ready(url: str, timeout: float = 120) -> None:
    api = client(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            api.list_compilation_jobs(MaxResults=1)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"kiln serve did not answer on {url} within {timeout} s")


def load_phase(url: str, aws_url: str, clients: int, creates: int, think: float, deadline_s: float,
               stall_s: float = 0, max_calls: int | None = None) -> dict[str, Any]:
    s3 = boto3.client("s3", endpoint_url=aws_url, region_name="us-east-1", aws_access_key_id="local",
                      aws_secret_access_key="local")
    s3.put_object(Bucket=MODELS, Key="load/model.tar.gz",
                  Body=tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
    recorder = Recorder()
    attempts = iter(range(creates))
    attempts_lock = threading.Lock()
    accepted: list[str] = []
    creating_done = threading.Event()
    creating_done_at = [float("inf")]  # perf_counter when the last create attempt was answered
    all_terminal = threading.Event()
    started = time.time()

    def next_attempt() -> int | None:
        with attempts_lock:
            return next(attempts, None)

    calls_left = [max_calls] if max_calls else None  # Describe/List calls still to make (None: no bound)

    def more_calls() -> bool:
        """Take one iteration's two Describe/List calls from the budget; False once it is spent."""
        with attempts_lock:
            if calls_left is None:
                return True
            calls_left[0] -= 2
            return calls_left[0] >= 0

    def work(index: int) -> None:
        api = client(url)
        rng = random.Random(index)
        while not all_terminal.is_set() and time.time() - started < deadline_s:
            if not more_calls() and creating_done.is_set():
                return  # the --calls budget is spent
            attempt = None if creating_done.is_set() else next_attempt()
            if attempt is not None:
                name = f"load-{attempt:04d}"
                result = recorder.call("CreateCompilationJob", api.create_compilation_job, CompilationJobName=name,
                                       RoleArn=ROLE, InputConfig={"S3Uri": f"s3://{MODELS}/load/model.tar.gz",
                                                                  "Framework": "ONNX",
                                                                  "DataInputConfig": '{"x": [1, 8]}'},
                                       OutputConfig={"S3OutputLocation": f"s3://{ARTIFACTS}/load/{name}",
                                                     "TargetDevice": "ml_c5"},
                                       StoppingCondition={"MaxRuntimeInSeconds": 900})
                if result is not None:
                    with attempts_lock:
                        accepted.append(name)
            elif not creating_done.is_set():
                creating_done_at[0] = time.perf_counter()
                creating_done.set()
            with attempts_lock:
                known = list(accepted)
            if known:
                recorder.call("DescribeCompilationJob", api.describe_compilation_job,
                              CompilationJobName=rng.choice(known))
            recorder.call("ListCompilationJobs", api.list_compilation_jobs, MaxResults=20, SortOrder="Descending",
                          **({"StatusEquals": "INPROGRESS"} if rng.random() < 0.3 else {}))
            time.sleep(think)

    def watch() -> None:
        api = client(url)
        while time.time() - started < deadline_s and any(t.is_alive() for t in threads):
            if creating_done.is_set():
                with attempts_lock:
                    names = list(accepted)
                statuses = [api.describe_compilation_job(CompilationJobName=n)["CompilationJobStatus"] for n in names]
                if all(s in TERMINAL for s in statuses):
                    all_terminal.set()
                    return
            time.sleep(2)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    watcher = threading.Thread(target=watch, daemon=True)
    for thread in [*threads, watcher]:
        thread.start()
    for thread in [*threads, watcher]:
        thread.join(timeout=max(1.0, deadline_s - (time.time() - started) + 30))
    api = client(url)
    at_bound = sum(api.describe_compilation_job(CompilationJobName=n)["CompilationJobStatus"] in TERMINAL
                   for n in accepted)
    drain_s = drain(api, accepted, stall_s) if at_bound < len(accepted) else 0.0
    described = [api.describe_compilation_job(CompilationJobName=n) for n in accepted]
    final = Counter(job["CompilationJobStatus"] for job in described)
    # how long jobs took: created -> INPROGRESS (the workflow asked for a container), INPROGRESS -> ended
    # (waiting for a compiler slot, then compiling)
    waited = [(j["CompilationStartTime"] - j["CreationTime"]).total_seconds() for j in described
              if j.get("CompilationStartTime")]
    compiled = [(j["CompilationEndTime"] - j["CompilationStartTime"]).total_seconds() for j in described
                if j.get("CompilationEndTime") and j.get("CompilationStartTime")]
    summary = recorder.summary()
    errors = {k: {"count": v, "first_message": summary["first_messages"].get(k, "")}
              for k, v in summary["outcomes"].items()
              if not k.endswith(":ok") and k != "CreateCompilationJob:ResourceLimitExceeded"}
    return {"clients": clients, "create_attempts": creates, "think_s": think, "max_calls": max_calls,
            "accepted": len(accepted),
            "refused_resource_limit": summary["outcomes"].get("CreateCompilationJob:ResourceLimitExceeded", 0),
            "errors_other_than_resource_limit": sum(e["count"] for e in errors.values()), "error_detail": errors,
            "final_statuses": dict(final), "every_job_terminal": sum(final.values()) == len(accepted)
            and all(s in TERMINAL for s in final), "terminal_at_bound": at_bound, "drain_s": drain_s,
            "wall_s": round(time.time() - started, 1),
            "job_seconds": {"created_to_inprogress": _spread(waited), "inprogress_to_ended": _spread(compiled)},
            "api": summary, "api_after_creates": recorder.after(creating_done_at[0])}


def drain(api: Any, names: list[str], stall_s: float, poll: float = 5) -> float:
    """After the clients stopped: wait until every job is terminal, or until none became terminal
    for ``stall_s`` (a stall: jobs that no longer progress). Returns the seconds waited."""
    started = last_progress = time.time()
    done = -1
    while stall_s > 0 and time.time() - last_progress < stall_s:
        terminal = sum(api.describe_compilation_job(CompilationJobName=n)["CompilationJobStatus"] in TERMINAL
                       for n in names)
        if terminal == len(names):
            break
        if terminal > done:
            done, last_progress = terminal, time.time()
        time.sleep(poll)
    return round(time.time() - started, 1)


def _spread(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(percentile(values, 50), 1), "max": round(max(values), 1)} if values else {}


def list_phase(url: str, aws_url: str, sizes: list[int], calls: int) -> dict[str, Any]:
    from kiln.store import JobStore

    dynamodb = boto3.resource("dynamodb", endpoint_url=aws_url, region_name="us-east-1",
                              aws_access_key_id="local", aws_secret_access_key="local")
    store = JobStore("kiln-jobs", pagination_key="unused-for-writes", max_active_jobs=10**9, dynamodb=dynamodb)
    api = client(url)
    existing = len(api.list_compilation_jobs(MaxResults=100)["CompilationJobSummaries"])  # phase 1's jobs
    inserted, results = 0, {}
    base = time.time() - 10**6
    statuses = ("COMPLETED", "FAILED", "STOPPED")

    def seeds(start: int, stop: int) -> Any:
        for index in range(start, stop):
            name, now = f"seed-{index:05d}", base + index
            yield {"CompilationJobName": name, "CompilationJobArn":
                   f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}",
                   "CompilationJobStatus": statuses[index % 3], "CreationTime": now, "LastModifiedTime": now,
                   "RoleArn": ROLE, "InputConfig": {"S3Uri": f"s3://{MODELS}/x.tar.gz", "Framework": "ONNX"},
                   "OutputConfig": {"S3OutputLocation": f"s3://{ARTIFACTS}/x", "TargetDevice": "ml_c5"},
                   "StoppingCondition": {"MaxRuntimeInSeconds": 900}, "FailureReason": ""}

    for size in sizes:
        insert_started = time.time()
        # JobStore.import_records (batch writes): moto's TransactWriteItems, which create uses, costs
        # O(rows) per write here (1,000 creates took 219 s), so 10,000 would take hours.
        target = max(size - existing, inserted)
        store.import_records(seeds(inserted, target))
        inserted = target
        insert_s = time.time() - insert_started
        recorder = Recorder()
        for i in range(calls):
            kwargs: list[dict[str, Any]] = [{"MaxResults": 100}, {"MaxResults": 100, "SortOrder": "Descending"},
                                            {"MaxResults": 100, "StatusEquals": "FAILED"},
                                            {"MaxResults": 100, "NameContains": "seed-0"},
                                            {"MaxResults": 100, "SortBy": "Name"}]
            recorder.call("ListCompilationJobs", api.list_compilation_jobs, **kwargs[i % len(kwargs)])
        summary = recorder.summary()["by_operation"]["ListCompilationJobs"]
        results[str(size)] = {**summary, "insert_s": round(insert_s, 1)}
        print(f"  {size:>6} jobs: ListCompilationJobs p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms "
              f"(inserted in {insert_s:.0f} s)", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--think", type=float, default=0.1, help="seconds each client waits between calls")
    parser.add_argument("--deadline", type=float, default=300, help="seconds phase 1 may take at most")
    parser.add_argument("--stall", type=float, default=300,
                        help="after phase 1, wait for unfinished jobs until none finished for this many s (0: no wait)")
    parser.add_argument("--calls", type=int, default=None,
                        help="Describe/List calls the clients make in all, then stop once the creates are made "
                             "(default: until every job is terminal or --deadline)")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--list-calls", type=int, default=50)
    parser.add_argument("--max-compilers", type=int, default=None, help="kiln serve --max-compilers")
    parser.add_argument("--api-workers", type=int, default=None, help="kiln serve --api-workers")
    parser.add_argument("--compiler-niceness", type=int, default=None, help="kiln serve --compiler-niceness")
    parser.add_argument("--compiler-cpu-share", choices=("own", "api"), default=None,
                        help="kiln serve --compiler-cpu-share")
    parser.add_argument("--label", default="", help="names the results files (e.g. before/after a change)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--skip-load", action="store_true", help="only the ListCompilationJobs phase")
    args = parser.parse_args()
    port, aws_port = free_port(), free_port()
    url, aws_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{aws_port}"
    with tempfile.TemporaryDirectory(prefix="kiln-load-") as tmp:
        server = start_server(Path(tmp), port, aws_port, args.max_compilers, args.api_workers, args.compiler_niceness,
                              args.compiler_cpu_share)
        try:
            wait_ready(url)
            load: dict[str, Any] = {}
            listing: dict[str, Any] = {}
            if not args.skip_load:
                print(f"phase 1: {args.clients} clients, {args.creates} creates against {url}", flush=True)
                with LoadAverage(compilers=lambda: compilers_running(server.pid)) as busy:
                    load = load_phase(url, aws_url, args.clients, args.creates, args.think, args.deadline,
                                      args.stall, args.calls)
                load["host_load_average"] = busy.summary()
                print(json.dumps({k: v for k, v in load.items() if k != "api"}, indent=2), flush=True)
                print(f"  API p50 {load['api']['p50_ms']} ms, p99 {load['api']['p99_ms']} ms "
                      f"over {load['api']['calls']} calls; after the creates {load['api_after_creates']}", flush=True)
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
            if sizes:  # --sizes '': phase 1 only
                print("phase 2: ListCompilationJobs latency by table size", flush=True)
                listing = list_phase(url, aws_url, sizes, args.list_calls)
        finally:
            stopping = time.monotonic()
            server.terminate()
            try:
                server.wait(timeout=30)
                shutdown_s: float | None = round(time.monotonic() - stopping, 1)
            except subprocess.TimeoutExpired:
                server.kill()
                shutdown_s = None  # not stopped within 30 s of SIGTERM
            print(f"kiln serve stopped {shutdown_s} s after SIGTERM", flush=True)
    report = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
              "cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu_model(), "api_workers": args.api_workers,
              "compiler_niceness": args.compiler_niceness, "compiler_cpu_share": args.compiler_cpu_share,
              "shutdown_s": shutdown_s, "load": load, "list_latency_by_table_size": listing}
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    stem = args.out / f"{dt.date.today().isoformat()}-{'list' if args.skip_load else 'load'}{label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report) if load else json.dumps(report, indent=2) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if not load or (load["errors_other_than_resource_limit"] == 0 and load["every_job_terminal"]) else 1


def markdown(report: dict[str, Any]) -> str:
    load, api = report["load"], report["load"]["api"]
    busy = load.get("host_load_average", {})
    lines = [f"# `make load` — {report['date']} on {report['host']} ({report['cpus']} CPUs, {report['cpu_model']})", "",
             f"Host load average (1 min) during phase 1: min {busy.get('min')}, mean {busy.get('mean')}, "
             f"max {busy.get('max')}; kiln serve --api-workers {report['api_workers']} (None: its default).", "",
             f"kiln serve --compiler-niceness {report.get('compiler_niceness')} --compiler-cpu-share "
             f"{report.get('compiler_cpu_share')} (None: its default); exited "
             f"{report.get('shutdown_s')} s after SIGTERM (None: not within 30 s).", "",
             f"{load['clients']} clients, {load['create_attempts']} CreateCompilationJob attempts "
             f"(think time {load['think_s']} s), then Describe/List until every accepted job was terminal "
             f"({load['wall_s']} s).", "",
             f"- accepted: {load['accepted']}; refused with ResourceLimitExceeded: {load['refused_resource_limit']}",
             f"- errors other than ResourceLimitExceeded: {load['errors_other_than_resource_limit']} "
             f"{load['error_detail'] or ''}",
             f"- every accepted job terminal: {load['every_job_terminal']} {load['final_statuses']} "
             f"({load.get('terminal_at_bound')} at the phase-1 bound; then {load.get('drain_s')} s more with the "
             "clients stopped, until all were or none finished for --stall s)",
             f"- job seconds (p50/max): {load.get('job_seconds')}; compiler processes running (sampled every 5 s): "
             f"{busy.get('compilers_running')}",
             f"- API latency over {api['calls']} calls: p50 {api['p50_ms']} ms, p99 {api['p99_ms']} ms; "
             f"after the last create was answered: {load.get('api_after_creates')}", "",
             "| operation | calls | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    lines += [f"| {op} | {v['calls']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |"
              for op, v in api["by_operation"].items()]
    if api.get("by_minute"):
        lines += ["", "| minute of phase 1 | calls | p50 ms | p99 ms |", "|---|---|---|---|"]
        lines += [f"| {m['minute']} | {m['calls']} | {m['p50_ms']} | {m['p99_ms']} |" for m in api["by_minute"]]
    lines += ["", "ListCompilationJobs (MaxResults 100, five filter/sort mixes) by jobs in the table "
              "(rows bulk-loaded with JobStore.import_records):", "", "| jobs | p50 ms | p99 ms | insert s |", "|---|---|---|---|"]
    lines += [f"| {size} | {v['p50_ms']} | {v['p99_ms']} | {v['insert_s']} |"
              for size, v in report["list_latency_by_table_size"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
