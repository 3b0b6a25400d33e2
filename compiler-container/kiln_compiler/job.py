"""One compilation job, end to end: fetch, unpack, load, build, package, upload."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.catalog import Family, TargetCatalog, UnsupportedTargetError

from . import aws, faults
from .archive import safe_extract
from .build import build
from .errors import ClientError
from .loaders import load_model
from .options import CompilerOptions, DataInputConfig
from .package import artifact_name, package

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
    raw: dict[str, Any] = field(default_factory=dict)

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
                raw=job,
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


def _tuning(options: CompilerOptions, work_dir: Path) -> tuple[Any, Any]:
    from .tuning import TuningConfig, TuningDatabase

    try:
        config = TuningConfig.from_options(options.raw)
    except ValueError as exc:
        raise ClientError(f"CompilerOptions tuning: {exc}", section="OutputConfiguration") from None
    location = os.environ.get("KILN_TUNING_DB")
    database = None
    if location:
        try:
            database = TuningDatabase(location, cache_dir=work_dir / "tuning-db") if location.startswith("s3://") \
                else TuningDatabase(location)
        except Exception:
            log.exception("tuning database %s unavailable; compiling without it", location)
    return config, database


def run_job(spec: JobSpec, work_dir: Path, *, session_factory: Callable[[str, str], Any] = aws.assume_job_role,
            catalog: TargetCatalog | None = None) -> dict[str, Any]:
    """Run the job; returns the success output. Raises CompilationError subclasses on failure."""
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
    options = CompilerOptions.parse(spec.compiler_options)
    coreml = target.family is Family.COREML
    # CoreML's DataInputConfig form (ranges, enumerated shapes, Image inputs) is read by kiln_compiler.coreml.
    config = DataInputConfig() if coreml else DataInputConfig.parse(spec.data_input_config, spec.framework)
    tuning, database = _tuning(options, work_dir)
    model_dir, build_dir = work_dir / "model", work_dir / "build"

    with timer.stage("credentials"):
        session = session_factory(spec.role_arn, spec.name)
    with timer.stage("download"):
        archive = aws.download(session, spec.s3_uri, work_dir / "input.tar.gz")
    with timer.stage("unpack"):
        safe_extract(archive, model_dir)
    if coreml:
        from .coreml import convert

        with timer.stage("build"):
            model, result = convert(spec.framework, model_dir, spec.data_input_config, options, target, build_dir)
    else:
        with timer.stage("load"):
            model = load_model(spec.framework, model_dir, config, options)
        with timer.stage("build"):
            result = build(model, target, options, build_dir, tuning=tuning, database=database, deadline=deadline)
    name = artifact_name(spec.s3_uri, target.name)
    with timer.stage("package"):
        artifact = package(model, target, result, work_dir / "out" / name, model_dir=model_dir,
                           job_name=spec.name, labels_name=options.class_labels)
    out_uri = f"{spec.output_location}/{name}"
    with timer.stage("upload"):
        aws.upload(session, artifact.path, out_uri, spec.kms_key_id)
    timer.timings["total"] = round(time.monotonic() - started, 3)
    derived = {s.name: list(s.shape) for s in model.inputs}
    return {
        "S3ModelArtifacts": out_uri,
        "ArtifactDigest": artifact.digest,
        "DerivedDataInputConfig": json.dumps(derived),
        "Timings": timer.timings,
        "Tuning": result.tuning,
    }
