"""The job adapter: one compilation job around ``compile_model`` (credentials, S3, packaging)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.catalog import TargetCatalog, UnsupportedTargetError

from . import aws, faults, profile
from .archive import safe_extract
from .compile import compile_model
from .errors import ClientError
from .options import CompilerOptions
from .package import artifact_name, package
from .profile import ProfileSettings

if TYPE_CHECKING:
    from .tuning import TuningDatabase

log = logging.getLogger(__name__)
UPLOAD_MARGIN_S = 60.0  # time kept back from MaxRuntimeInSeconds for packaging and upload


@dataclass
class JobSpec:
    """The fields of ``KILN_JOB`` the compiler uses."""

    name: str
    role_arn: str
    s3_uri: str
    framework: str
    data_input_config: str | None
    output_location: str
    output_config: dict[str, Any]
    compiler_options: str | None
    kms_key_id: str | None
    max_runtime_s: float | None

    @classmethod
    def parse(cls, text: str) -> JobSpec:
        """Parse ``KILN_JOB``; a malformed job is our bug (the API validated it)."""
        try:
            job = json.loads(text)
            inp, out = job["InputConfig"], job["OutputConfig"]
            return cls(
                name=job["CompilationJobName"],
                role_arn=job["RoleArn"],
                s3_uri=inp["S3Uri"],
                framework=str(inp["Framework"]).upper(),
                data_input_config=inp.get("DataInputConfig"),
                output_location=out["S3OutputLocation"].rstrip("/"),
                output_config=out,
                compiler_options=out.get("CompilerOptions"),
                kms_key_id=out.get("KmsKeyId"),
                max_runtime_s=(job.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed KILN_JOB: {exc!r}") from None


class Timer:
    """Seconds spent per stage."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s: start", name)
        faults.enter_stage(name)  # test-only fault injection (KILN_FAULT); a no-op otherwise
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
            log.info("stage %s: %.2fs", name, self.timings[name])


@dataclass(frozen=True)
class CompilerSettings:
    """How this compiler deployment is configured (the container's environment, read once by __main__)."""

    tuning_database: str | None = None  # s3://bucket/prefix or a local directory (KILN_TUNING_DB)
    runner: str | None = None  # the kiln.catalog.Runner this container is (KILN_RUNNER, set per runner by CDK)
    profile: ProfileSettings = field(default_factory=ProfileSettings)  # KILN_PROFILE: where it may be measured

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CompilerSettings:
        """Settings from the container environment the workflow's task definition sets."""
        return cls(tuning_database=env.get("KILN_TUNING_DB") or None, runner=env.get("KILN_RUNNER") or None,
                   profile=ProfileSettings.from_env(env))


def open_tuning_database(location: str | None, work_dir: Path) -> TuningDatabase | None:
    """The shared tuning database at ``location`` (None when unset or unreachable: compile without it)."""
    if not location:
        return None
    from .tuning import TuningDatabase

    try:
        if location.startswith("s3://"):
            return TuningDatabase(location, cache_dir=work_dir / "tuning-db")
        return TuningDatabase(location)
    except Exception:
        log.exception("tuning database %s unavailable; compiling without it", location)
        return None


def run_job(spec: JobSpec, work_dir: Path, *, settings: CompilerSettings = CompilerSettings(),
            session_factory: Callable[[str, str], Any] = aws.assume_job_role,
            catalog: TargetCatalog | None = None) -> dict[str, Any]:
    """Run the job: credentials -> download -> unpack -> compile_model -> package -> upload.

    Returns the success output; raises CompilationError subclasses on failure."""
    started = time.monotonic()
    deadline = time.time() + spec.max_runtime_s - UPLOAD_MARGIN_S if spec.max_runtime_s else None
    timer = Timer()
    catalog = catalog or TargetCatalog()
    try:
        target = catalog.for_output_config(spec.output_config)
    except UnsupportedTargetError as exc:
        raise ClientError(str(exc), section="OutputConfiguration") from None
    except KeyError:
        raise ClientError("OutputConfig needs TargetDevice or TargetPlatform", section="OutputConfiguration") from None
    options = CompilerOptions.parse(spec.compiler_options, target)
    model_dir = work_dir / "model"

    with timer.stage("credentials"):
        session = session_factory(spec.role_arn, spec.name)
    with timer.stage("download"):
        archive = aws.download(session, spec.s3_uri, work_dir / "input.tar.gz")
    with timer.stage("unpack"):
        safe_extract(archive, model_dir)
    result = compile_model(model_dir, spec.framework, target, options, out_dir=work_dir / "build",
                           data_input_config=spec.data_input_config, deadline=deadline, stage=timer.stage,
                           tuning_database=open_tuning_database(settings.tuning_database, work_dir))
    if result.unscheduled:
        log.warning("%d kernels kept TVM's unscheduled loops: %s", len(result.unscheduled),
                    ", ".join(result.unscheduled))
    name = artifact_name(spec.s3_uri, target.name)

    def measure(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        left = deadline - time.time() if deadline else None
        reason = profile.why_not(target, manifest, settings.profile, settings.runner, left)
        if reason:
            log.info("artifact not profiled: %s", reason)
            return profile.not_measured(reason)
        with timer.stage("profile"):
            return profile.profile_artifact(root, settings.profile, runner=settings.runner, seconds_left=left)

    with timer.stage("package"):
        artifact = package(result, target, work_dir / "out" / name, model_dir=model_dir,
                           job_name=spec.name, labels_name=options.class_labels, profiler=measure)
    out_uri = f"{spec.output_location}/{name}"
    with timer.stage("upload"):
        aws.upload(session, artifact.path, out_uri, spec.kms_key_id)
    timer.timings["total"] = round(time.monotonic() - started, 3)
    derived = {s.name: list(s.shape) for s in result.model.inputs}
    return {
        "S3ModelArtifacts": out_uri,
        "ArtifactDigest": artifact.digest,
        "DerivedDataInputConfig": json.dumps(derived),
        "Timings": timer.timings,
        "Tuning": result.tuning,
        "Profile": artifact.manifest.get("profile"),
        "Precision": artifact.manifest.get("precision"),
    }
