"""The web console: compilation jobs in a browser, server-rendered from the public API.

Every page is built from the SageMaker API calls any client makes (List/Describe/Create/Stop/
DeleteCompilationJob) through a boto3 client: the local one of ``kiln serve`` or, for a deployed
Kiln, one that signs with the user's AWS credentials for ``execute-api`` (``kiln console --api``).
Client-side parameter validation is off, so a form shows the API's own validation message.
The artifact's manifest (ISA, digests, tuning summary, profile) is read from the artifact in S3
with the same credentials, and the download link is a presigned S3 URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import tarfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from jinja2 import Environment, PackageLoader, select_autoescape
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.utils import redirect
from werkzeug.wrappers import Request, Response

from kiln.catalog import ALL_FRAMEWORKS, TargetCatalog
from kiln.hints import suggest_fix
from kiln.isa import vector_isa_name

log = logging.getLogger("kiln.console")

PREFIX = "/console"
TERMINAL = ("COMPLETED", "FAILED", "STOPPED")
STATUSES = ("STARTING", "INPROGRESS", "COMPLETED", "FAILED", "STOPPING", "STOPPED")
SORT_KEYS = ("CreationTime", "Name", "Status")
PAGE_SIZES = (10, 20, 50, 100)
MANIFEST = "manifest.json"
_MANIFEST_MAX_BYTES = 1 << 20
_STATIC = Path(__file__).resolve().parent / "static"
# botocore's own checks would answer before the API does; the console shows the API's messages.
_NO_CLIENT_VALIDATION = Config(parameter_validation=False, retries={"max_attempts": 2, "mode": "standard"})


def local_api(endpoint_url: str) -> Any:
    """A SageMaker client for ``kiln serve`` at ``endpoint_url`` (local mode takes any credentials)."""
    return boto3.client("sagemaker", endpoint_url=endpoint_url, region_name="us-east-1",
                        aws_access_key_id="local", aws_secret_access_key="local", config=_NO_CLIENT_VALIDATION)


def signed_api(api_url: str, *, region_name: str | None = None, session: boto3.session.Session | None = None) -> Any:
    """A SageMaker client for a deployed Kiln, SigV4-signed for execute-api with the session's credentials."""
    from kiln.client import sagemaker_client

    return sagemaker_client(api_url, region_name=region_name, session=session, config=_NO_CLIENT_VALIDATION)


@dataclass
class Artifacts:
    """Reads artifacts' manifests from S3 and links to them (presigned GET)."""

    s3: Any
    link_seconds: int = 3600

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return bucket, key

    def manifest(self, uri: str) -> dict[str, Any]:
        """The artifact's manifest.json (the first member of every Kiln artifact)."""
        bucket, key = self._split(uri)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        with tarfile.open(fileobj=_Capped(body, _MANIFEST_MAX_BYTES), mode="r|gz") as tar:
            for member in tar:
                if member.name == MANIFEST:
                    data = tar.extractfile(member)
                    if data is not None:
                        return dict(json.loads(data.read()))
                break
        raise ValueError("the artifact has no manifest.json")

    def link(self, uri: str) -> str:
        bucket, key = self._split(uri)
        return str(self.s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=self.link_seconds))


class _Capped(io.RawIOBase):
    """A streaming body read no further than ``limit`` bytes (the manifest comes first)."""

    def __init__(self, body: Any, limit: int) -> None:
        self._body, self._left = body, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        chunk = self._body.read(min(len(buffer), self._left))
        buffer[: len(chunk)] = chunk
        self._left -= len(chunk)
        return len(chunk)


@dataclass
class FormDefaults:
    """What the create form starts with (local mode fills in its role and buckets)."""

    role_arn: str = ""
    input_prefix: str = ""
    output_prefix: str = ""


@dataclass
class ConsoleApp:
    """The console as a WSGI application under ``/console``."""

    api: Any
    artifacts: Artifacts | None = None
    defaults: FormDefaults = field(default_factory=FormDefaults)
    catalog: TargetCatalog = field(default_factory=TargetCatalog)

    def __post_init__(self) -> None:
        self._env = Environment(loader=PackageLoader("kiln.console", "templates"),
                                autoescape=select_autoescape(["html"]))
        self._env.filters["when"] = _when
        self._env.filters["vector_isa"] = vector_isa_name
        self._env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
        self._env.globals.update(prefix=PREFIX, statuses=STATUSES, terminal=TERMINAL)
        self._routes = Map([
            Rule(f"{PREFIX}", endpoint="jobs", methods=["GET"]),
            Rule(f"{PREFIX}/", endpoint="jobs", methods=["GET"]),
            Rule(f"{PREFIX}/new", endpoint="new", methods=["GET", "POST"]),
            Rule(f"{PREFIX}/jobs/<name>", endpoint="job", methods=["GET"]),
            Rule(f"{PREFIX}/jobs/<name>/stop", endpoint="stop", methods=["POST"]),
            Rule(f"{PREFIX}/jobs/<name>/delete", endpoint="delete", methods=["POST"]),
            Rule(f"{PREFIX}/jobs/<name>/artifact", endpoint="artifact", methods=["GET"]),
            Rule(f"{PREFIX}/static/<file>", endpoint="static", methods=["GET"]),
        ], strict_slashes=False)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        adapter = self._routes.bind_to_environ(environ)
        try:
            endpoint, values = adapter.match()
            response = getattr(self, f"_{endpoint}")(request, **values)
        except HTTPException as exc:
            response = exc.get_response()
        return response(environ, start_response)

    # -- pages -------------------------------------------------------------------------------
    def _render(self, template: str, status: int = 200, **context: Any) -> Response:
        html = self._env.get_template(template).render(**context)
        return Response(html, status=status, mimetype="text/html")

    def _jobs(self, request: Request) -> Response:
        args = request.args
        status = args.get("status", "")
        name = args.get("name", "").strip()
        sort = args.get("sort", "CreationTime")
        order = args.get("order", "Descending")
        size = args.get("max", "20")
        token = args.get("token", "")
        # NextToken only goes forward: the tokens of the pages before this one travel in the URL
        trail = args.getlist("back")
        query: dict[str, Any] = {"SortBy": sort, "SortOrder": order, "MaxResults": _int_or_text(size)}
        if status:
            query["StatusEquals"] = status
        if name:
            query["NameContains"] = name
        if token:
            query["NextToken"] = token
        filters = {"status": status, "name": name, "sort": sort, "order": order, "max": size}
        error, rows, next_token = None, [], None
        try:
            listed = self.api.list_compilation_jobs(**query)
            next_token = listed.get("NextToken")
            summaries = listed.get("CompilationJobSummaries", [])
            # one DescribeCompilationJob per row (a summary has no framework), made concurrently
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(summaries)))) as pool:
                rows = list(pool.map(self._row, summaries))
        except (ClientError, BotoCoreError) as exc:
            error = _message(exc)

        def page_url(page_token: str, back: list[str]) -> str:
            params = list(filters.items()) + [("back", t) for t in back]
            return f"{PREFIX}?{urlencode(params + ([('token', page_token)] if page_token else []))}"

        next_url = page_url(next_token, [*trail, token]) if next_token else None
        previous_url = page_url(trail[-1], trail[:-1]) if token else None
        first_url = f"{PREFIX}?{urlencode(filters)}" if token and trail else None
        return self._render("jobs.html", rows=rows, filters=filters, error=error, next_url=next_url,
                            previous_url=previous_url, first_url=first_url, sort_keys=SORT_KEYS, page_sizes=PAGE_SIZES,
                            flash=args.get("flash"), title="Compilation jobs")

    def _row(self, summary: dict[str, Any]) -> dict[str, Any]:
        name = summary["CompilationJobName"]
        framework = ""
        with contextlib.suppress(ClientError, BotoCoreError, KeyError):  # (deleted meanwhile)
            # a summary has no framework; DescribeCompilationJob has
            framework = self.api.describe_compilation_job(CompilationJobName=name)["InputConfig"].get("Framework", "")
        target = summary.get("CompilationTargetDevice") or "_".join(
            str(summary[k]) for k in ("CompilationTargetPlatformOs", "CompilationTargetPlatformArch",
                                      "CompilationTargetPlatformAccelerator") if summary.get(k))
        return {"name": name, "status": summary["CompilationJobStatus"], "target": target, "framework": framework,
                "created": summary.get("CreationTime"), "duration": _duration(summary)}

    def _job(self, request: Request, name: str) -> Response:
        try:
            job = self.api.describe_compilation_job(CompilationJobName=name)
        except (ClientError, BotoCoreError) as exc:  # no such job, or the API cannot be reached
            return self._render("missing.html", status=404 if isinstance(exc, ClientError) else 502, name=name,
                                error=_message(exc), title=name)
        manifest, manifest_error, link = None, None, None
        uri = (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if job["CompilationJobStatus"] == "COMPLETED" and uri and self.artifacts is not None:
            try:
                manifest = self.artifacts.manifest(uri)
                link = f"{PREFIX}/jobs/{name}/artifact"
            except (ClientError, BotoCoreError, OSError, ValueError, tarfile.TarError) as exc:
                manifest_error = _message(exc)
        return self._render("job.html", job=job, timeline=_timeline(job), fix=suggest_fix(job.get("FailureReason")),
                            manifest=manifest, manifest_error=manifest_error, artifact_link=link,
                            flash=request.args.get("flash"), error=request.args.get("error"), title=name)

    def _new(self, request: Request) -> Response:
        form = dict(request.form) if request.method == "POST" else self._blank_form()
        error = None
        if request.method == "POST":
            create = _create_request(form)
            try:
                self.api.create_compilation_job(**create)
                return redirect(f"{PREFIX}/jobs/{create['CompilationJobName']}?flash=created", code=303)
            except (ClientError, BotoCoreError) as exc:
                error = _message(exc)
        return self._render("new.html", status=400 if error else 200, form=form, error=error,
                            frameworks=ALL_FRAMEWORKS, devices=self.catalog.supported_devices, title="New job")

    def _blank_form(self) -> dict[str, str]:
        return {"name": "", "s3_uri": self.defaults.input_prefix, "framework": "ONNX", "data_input_config": "",
                "framework_version": "", "target_device": "ml_c5", "platform_os": "", "platform_arch": "",
                "platform_accelerator": "", "compiler_options": "", "output": self.defaults.output_prefix,
                "role_arn": self.defaults.role_arn, "max_runtime": "900"}

    def _stop(self, request: Request, name: str) -> Response:
        return self._act(name, lambda: self.api.stop_compilation_job(CompilationJobName=name),
                         f"{PREFIX}/jobs/{name}", "stop requested")

    def _delete(self, request: Request, name: str) -> Response:
        return self._act(name, lambda: self.api.delete_compilation_job(CompilationJobName=name),
                         PREFIX, f"deleted {name}")

    def _act(self, name: str, call: Callable[[], Any], then: str, flash: str) -> Response:
        try:
            call()
        except (ClientError, BotoCoreError) as exc:
            return redirect(f"{PREFIX}/jobs/{name}?{urlencode({'error': _message(exc)})}", code=303)
        return redirect(f"{then}?{urlencode({'flash': flash})}", code=303)

    def _artifact(self, request: Request, name: str) -> Response:
        try:
            job = self.api.describe_compilation_job(CompilationJobName=name)
        except (ClientError, BotoCoreError) as exc:
            raise NotFound(_message(exc)) from None
        uri = (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if not uri or self.artifacts is None:
            raise NotFound(f"job {name} has no artifact")
        return redirect(self.artifacts.link(uri), code=302)

    def _static(self, request: Request, file: str) -> Response:
        path = _STATIC / file
        if path.parent != _STATIC or not path.is_file():
            raise NotFound()
        mimetype = "text/css" if path.suffix == ".css" else "application/octet-stream"
        return Response(path.read_bytes(), mimetype=mimetype)


def _create_request(form: dict[str, str]) -> dict[str, Any]:
    """CreateCompilationJob from the form's fields (empty fields left out, as a client would)."""
    value = {k: v.strip() for k, v in form.items()}
    input_config: dict[str, Any] = {"S3Uri": value.get("s3_uri", ""), "Framework": value.get("framework", "")}
    if value.get("data_input_config"):
        input_config["DataInputConfig"] = value["data_input_config"]
    if value.get("framework_version"):
        input_config["FrameworkVersion"] = value["framework_version"]
    output: dict[str, Any] = {"S3OutputLocation": value.get("output", "")}
    if value.get("target_device"):
        output["TargetDevice"] = value["target_device"]
    if value.get("platform_os") or value.get("platform_arch"):
        output["TargetPlatform"] = {k: value[f"platform_{k.lower()}"] for k in ("Os", "Arch", "Accelerator")
                                    if value.get(f"platform_{k.lower()}")}
    if value.get("compiler_options"):
        output["CompilerOptions"] = value["compiler_options"]
    request: dict[str, Any] = {"CompilationJobName": value.get("name", ""), "RoleArn": value.get("role_arn", ""),
                               "InputConfig": input_config, "OutputConfig": output}
    if value.get("max_runtime"):
        request["StoppingCondition"] = {"MaxRuntimeInSeconds": _int_or_text(value["max_runtime"])}
    return request


def _int_or_text(text: str) -> int | str:
    """An integer field as typed: the API names the field when it is not one."""
    try:
        return int(text)
    except ValueError:
        return text


def _message(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'Error')}: {error.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


def _duration(job: dict[str, Any]) -> str:
    start, end = job.get("CompilationStartTime"), job.get("CompilationEndTime")
    if not isinstance(start, dt.datetime):
        return ""
    if not isinstance(end, dt.datetime):
        if job.get("CompilationJobStatus") in TERMINAL:
            return ""
        end = dt.datetime.now(start.tzinfo)
        return f"{_seconds(end - start)} (running)"
    return _seconds(end - start)


def _seconds(delta: dt.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _timeline(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The states a job went through, from its timestamps."""
    status = job["CompilationJobStatus"]
    steps = [{"state": "STARTING", "what": "created", "at": job.get("CreationTime")}]
    if job.get("CompilationStartTime"):
        steps.append({"state": "INPROGRESS", "what": "compiler started", "at": job["CompilationStartTime"]})
    if status in TERMINAL:
        steps.append({"state": status, "what": "ended", "at": job.get("CompilationEndTime") or job.get("LastModifiedTime")})
    elif status == "STOPPING":
        steps.append({"state": "STOPPING", "what": "stop requested", "at": job.get("LastModifiedTime")})
    return steps


class ConsoleServer:
    """The console alone on host:port in a background thread (``kiln console``)."""

    def __init__(self, api: Any, host: str = "127.0.0.1", port: int = 8090, artifacts: Artifacts | None = None) -> None:
        app = ConsoleApp(api, artifacts)

        def root(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if not environ.get("PATH_INFO", "").startswith(PREFIX):
                return redirect(PREFIX)(environ, start_response)
            return app(environ, start_response)

        self._server: BaseWSGIServer = make_server(host, port, root, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-console", daemon=True)

    def start(self) -> ConsoleServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
