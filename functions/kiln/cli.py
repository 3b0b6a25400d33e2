"""The ``kiln`` command: local serving, one-shot compilation, and running artifacts."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True)
# The command's result (JSON) goes to the real stdout; everything else, Powertools' JSON logs of the
# in-process handlers included (they write to sys.stdout), goes to stderr.
_result = sys.stdout


def _emit(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str), file=_result, flush=True)


def _platform(text: str) -> dict[str, str]:
    """``Os=LINUX,Arch=ARM64[,Accelerator=NVIDIA]`` -> TargetPlatform."""
    try:
        pairs = dict(part.split("=", 1) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError("use Os=LINUX,Arch=ARM64[,Accelerator=NVIDIA]") from None
    unknown = set(pairs) - {"Os", "Arch", "Accelerator"}
    if unknown or not {"Os", "Arch"} <= set(pairs):
        raise argparse.ArgumentTypeError("use Os=LINUX,Arch=ARM64[,Accelerator=NVIDIA]")
    return pairs


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _niceness(text: str) -> int:
    if not text.isdigit() or int(text) > 19:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 19, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: SageMaker-compatible model compilation")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library, Lambda and compiler logs (and traces of unexpected errors)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API locally with an embedded AWS endpoint")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--aws-port", type=int, default=None, help="embedded AWS endpoint port (default PORT+1)")
    serve.add_argument("--work-dir", type=Path, default=None, help="where compiler processes work")
    serve.add_argument("--max-compilers", type=_positive, default=None,
                       help="compiler processes at once; the rest wait as pending (default: CPU count)")
    serve.add_argument("--api-workers", type=_non_negative, default=None,
                       help="processes serving the API beside the embedded stack's, one request at a time "
                            "each (default 4; 0: serve it in the stack's process)")
    serve.add_argument("--compiler-niceness", type=_niceness, default=None,
                       help="how far below the API's CPU priority compiler processes run, 0-19 (default 10)")
    serve.add_argument("--compiler-cpu-share", choices=("own", "api"), default=None,
                       help="own: each compiler in a session of its own, a CPU share beside the API's (default); "
                            "api: compilers in this session, below the API (it wins; they take what it leaves)")

    compile_ = sub.add_parser("compile", help="compile one model through the full job path, locally")
    compile_.add_argument("model", type=Path, help="the model archive (.tar.gz)")
    compile_.add_argument("--framework", required=True, type=str.upper)
    target = compile_.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-device", help="a SageMaker TargetDevice, or 'host' for the catalog target "
                                                "that matches this machine (Kiln's extension)")
    target.add_argument("--target-platform", type=_platform)
    compile_.add_argument("--data-input-config")
    compile_.add_argument("--framework-version")
    compile_.add_argument("--compiler-options")
    compile_.add_argument("--max-runtime", type=int, default=900, help="MaxRuntimeInSeconds")
    compile_.add_argument("--output-dir", type=Path, default=Path("."))
    compile_.add_argument("--job-name", default=None)
    compile_.add_argument("--json", action="store_true",
                          help="print the final DescribeCompilationJob as JSON on stdout (machine-readable)")

    run = sub.add_parser("run", help="run a compiled artifact on inputs")
    from kiln_runtime.cli import add_run_arguments

    add_run_arguments(run)  # the arguments of kiln-runtime's kiln-run
    run.add_argument("--emulate", action="store_true",
                     help="run an aarch64 artifact on this x86 host under qemu-user (numerics, not speed)")

    serve_model = sub.add_parser("serve-model", help="serve an artifact over SageMaker's inference-container "
                                                     "contract (GET /ping, POST /invocations)")
    serve_model.add_argument("artifact", type=Path, help="the artifact (.tar.gz or its unpacked directory)")
    serve_model.add_argument("--host", default="127.0.0.1")
    serve_model.add_argument("--port", type=int, default=8080)
    serve_model.add_argument("--threads", type=int, default=0, help="kernel threads (default: the CPU quota)")

    bench = sub.add_parser("bench", help="measure an artifact's latency on random inputs")
    bench.add_argument("artifact", type=Path)
    bench.add_argument("--repeat", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3)

    console_ = sub.add_parser("console", help="serve the web console for a deployed Kiln, signing its API calls "
                                               "with your AWS credentials (SigV4, execute-api)")
    console_.add_argument("--api", required=True, help="the deployed API's URL "
                                                       "(https://ID.execute-api.REGION.amazonaws.com/prod)")
    console_.add_argument("--region", default=None, help="signing region (default: from the URL)")
    console_.add_argument("--host", default="127.0.0.1")
    console_.add_argument("--port", type=int, default=8090)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _result
    args = build_parser().parse_args(argv)
    _result, sys.stdout = sys.stdout, sys.stderr
    _configure_logging(args.verbose, serving=args.command in ("serve", "console", "serve-model"))
    handlers = {"serve": _serve, "compile": _compile, "run": _run, "bench": _bench, "console": _console,
                "serve-model": _serve_model}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: the embedded stack stopped its compiler processes on the way out
        console.print("interrupted", style="yellow")
        return 130
    except Exception as exc:  # a user sees what went wrong, not a trace (unless --verbose)
        if args.verbose:
            raise
        console.print(f"[red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        console.print("run again with --verbose for the logs and the trace", style="dim")
        return 1
    finally:
        sys.stdout = _result


def _configure_logging(verbose: bool, *, serving: bool) -> None:
    """Library, Lambda and moto logs only with ``--verbose``; a server keeps its request lines."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "moto"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("moto.stepfunctions").setLevel(logging.CRITICAL)
    if serving:
        logging.getLogger("kiln.serve").setLevel(logging.INFO)
        logging.getLogger("kiln_serving").setLevel(logging.INFO)
    if not verbose:
        # the in-process Lambda handlers log JSON lines through Powertools (their own handlers)
        from kiln.handlers import api, registry, workflow

        for handler in (api, registry, workflow):
            handler.logger.setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from kiln.console.app import PREFIX, Artifacts, ConsoleApp, FormDefaults, local_api
    from kiln.local import heap
    from kiln.local.api_workers import ApiWorkers
    from kiln.local.server import ApiServer
    from kiln.local.settings import LocalSettings
    from kiln.local.stack import EmbeddedStack

    given = {"max_compilers": args.max_compilers, "api_workers": args.api_workers,
             "compiler_niceness": args.compiler_niceness, "compiler_cpu_share": args.compiler_cpu_share}
    local = LocalSettings(**{name: value for name, value in given.items() if value is not None})
    stack = EmbeddedStack(host=args.host, aws_port=args.aws_port or args.port + 1, work_dir=args.work_dir,
                          local=local).start()
    # before the API answers: the first collection walks the whole start-up heap (~0.4 s holding the
    # interpreter lock), which otherwise paused the first requests (ADR 0050)
    heap.settle()
    workers = local.api_workers
    server: ApiServer | ApiWorkers
    if workers and os.name == "posix":  # workers inherit the listening socket (POSIX only)
        server = ApiWorkers(stack, args.host, args.port, workers).start()
    else:
        server = ApiServer(args.host, args.port)
        server.mount(PREFIX, ConsoleApp(local_api(server.url), Artifacts(stack.client("s3")), FormDefaults(
            role_arn=stack.outputs["JobRoleArn"], input_prefix=f"s3://{stack.outputs['ModelBucket']}/",
            output_prefix=f"s3://{stack.outputs['ArtifactBucket']}/"))).start()
    console.print(f"[bold]Kiln[/] API on {server.url}  (embedded AWS on {stack.endpoint_url})")
    console.print(f"  boto3.client('sagemaker', endpoint_url='{server.url}')")
    console.print(f"  job role: {stack.outputs['JobRoleArn']}  buckets: s3://{stack.outputs['ModelBucket']}, "
                  f"s3://{stack.outputs['ArtifactBucket']}")
    console.print(f"  console: {server.url}/console")
    heap.settle()  # and what the API's start built (ADR 0043)
    _wait_for_stop()
    started = time.monotonic()
    server.stop()
    stack.stop()  # its compiler processes too: jobs not yet terminal end with it (its state is in memory)
    console.print(f"stopped in {time.monotonic() - started:.1f} s")
    _exit_without_finalising(0)
    return 0


def _exit_without_finalising(code: int) -> None:
    """Exit now that everything is stopped: the interpreter's teardown of moto's in-memory state
    took longer than the whole stop (~5 s measured), and there is nothing left in it to save."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, _result):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _wait_for_stop() -> None:
    """Block until SIGTERM or Ctrl-C."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    console.print("stopping…")


def _console(args: argparse.Namespace) -> int:
    import boto3

    from kiln.client import region_from_url
    from kiln.console.app import Artifacts, ConsoleServer, signed_api

    session = boto3.session.Session()
    region = args.region or region_from_url(args.api) or session.region_name or "us-east-1"
    server = ConsoleServer(signed_api(args.api, region_name=region, session=session), args.host, args.port,
                           artifacts=Artifacts(session.client("s3", region_name=region))).start()
    console.print(f"[bold]Kiln console[/] on {server.url}/console  (API {args.api}, signed with your AWS "
                  "credentials for execute-api)")
    _wait_for_stop()
    server.stop()
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    from kiln_serving.config import ServingSettings
    from kiln_serving.server import serve
    from pydantic import ValidationError

    if not args.artifact.exists():
        console.print(f"[red]no such artifact: {args.artifact}[/]")
        return 2
    try:
        settings = ServingSettings(model=args.artifact, host=args.host, port=args.port, threads=args.threads)
    except ValidationError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    console.print(f"[bold]Kiln[/] serving {args.artifact} on http://{args.host}:{args.port}  "
                  "(GET /ping, POST /invocations)")
    serve(settings)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from kiln import terminal
    from kiln.catalog import TargetCatalog
    from kiln.errors import KilnError
    from kiln.host import HOST, NoHostTargetError, host_target
    from kiln.local.stack import EmbeddedStack

    if not args.model.is_file():
        console.print(f"[red]no such file: {args.model}[/]")
        return 2
    if args.target_device == HOST:
        try:
            args.target_device = host_target().name
        except NoHostTargetError as exc:
            console.print(f"[red]{exc}[/]")
            return 2
        console.print(f"target {args.target_device} (matches this host)", style="dim")
    description = ""
    if args.target_device and args.target_device in TargetCatalog().supported_devices:
        description = f"({TargetCatalog().device(args.target_device).description})"  # else the API names it
    name = args.job_name or f"kiln-compile-{int(time.time())}"
    basename = args.model.name[: -len(".tar.gz")] if args.model.name.endswith(".tar.gz") else args.model.stem
    started = time.time()
    with EmbeddedStack() as stack:
        s3 = stack.client("s3")
        bucket, artifacts = stack.outputs["ModelBucket"], stack.outputs["ArtifactBucket"]
        s3.upload_file(str(args.model), bucket, f"{name}/{basename}.tar.gz")
        input_config: dict[str, Any] = {"S3Uri": f"s3://{bucket}/{name}/{basename}.tar.gz",
                                        "Framework": args.framework}
        if args.data_input_config:
            input_config["DataInputConfig"] = args.data_input_config
        if args.framework_version:
            input_config["FrameworkVersion"] = args.framework_version
        output: dict[str, Any] = {"S3OutputLocation": f"s3://{artifacts}/{name}"}
        if args.target_device:
            output["TargetDevice"] = args.target_device
        else:
            output["TargetPlatform"] = args.target_platform
        if args.compiler_options:
            output["CompilerOptions"] = args.compiler_options
        service = stack.kiln.service
        try:
            service.create({"CompilationJobName": name, "RoleArn": stack.outputs["JobRoleArn"],
                            "InputConfig": input_config, "OutputConfig": output,
                            "StoppingCondition": {"MaxRuntimeInSeconds": args.max_runtime}})
        except KilnError as exc:
            console.print(f"[red]{exc.code}: {exc.message}[/]", highlight=False)
            return 2
        log_path = stack.work_dir / "containers" / name / f"{name}.log"
        job = terminal.JobFollower(console, lambda: service.describe(name), log_path,
                                   verbose=args.verbose).follow(started)
        # the registry hook handles the job's state-change event before the stack stops (quietly)
        stack.wait_for_registry(timeout=10)
        if job["CompilationJobStatus"] != "COMPLETED":
            console.print(terminal.failure(job))
            if args.json:
                _emit(job)
            return 1
        uri = job["ModelArtifacts"]["S3ModelArtifacts"]
        key = uri.split("/", 3)[3]
        args.output_dir.mkdir(parents=True, exist_ok=True)
        local = args.output_dir / key.rsplit("/", 1)[-1]
        s3.download_file(artifacts, key, str(local))
    elapsed = time.time() - started
    manifest = terminal.read_artifact_manifest(local)
    latency = None if terminal.measured_profile(job) else terminal.artifact_latency(local)
    console.print(terminal.summary(job, local, manifest, latency, elapsed, description))
    if args.json:
        _emit(job)
    return 0


def _run(args: argparse.Namespace) -> int:
    from kiln_runtime.cli import UsageError, read_inputs, run_command

    if not args.emulate:
        return run_command(args)
    from kiln import emulate
    from kiln.runtime import ArtifactError

    try:
        outputs = emulate.run(args.artifact, read_inputs(args.input))
    except (UsageError, ArtifactError, emulate.EmulationError) as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    for index, value in enumerate(outputs):
        console.print(f"output {index}: shape {tuple(value.shape)} dtype {value.dtype} (emulated)")
        if args.output_dir:
            import numpy as np

            args.output_dir.mkdir(parents=True, exist_ok=True)
            np.save(args.output_dir / f"output_{index}.npy", value)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import statistics

    import numpy as np

    from kiln import runtime

    model = runtime.load(args.artifact)
    rng = np.random.default_rng(0)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(spec.dtype) for spec in model.inputs}
    for _ in range(args.warmup):
        model.run(feeds)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model.run(feeds)
        times.append((time.perf_counter() - t0) * 1000)
    _emit({"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
           "repeat": args.repeat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
