"""The job adapter: one compilation job around ``compile_model`` (credentials, S3, packaging)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import rules
from kiln.catalog import TargetCatalog, UnsupportedTargetError

from . import accuracy, aws, faults, profile
from .archive import safe_extract
from .compile import compile_model, tune_model
from .errors import ClientError
from .options import CompilerOptions, Shard
from .package import artifact_name, package
from .profile import ProfileSettings

if TYPE_CHECKING:
    from .tuning import TuningDatabase

log = logging.getLogger(__name__)
UPLOAD_MARGIN_S = 60.0  # time kept back from MaxRuntimeInSeconds for packaging and upload
SHARD_ENV = "KILN_TUNING_SHARD"  # "i/N": this container is tuning worker i of N (set by the workflow's Map state)


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


def tuning_prefix(spec: JobSpec) -> str:
    """Where a fanned-out job's tuning workers put their records: under the job's output location, which the
    job's role may write (Kiln's own role reads no user data); one folder per worker (ADR 0023)."""
    return f"{spec.output_location}/kiln-tuning/{spec.name}"


def _tune_shard(spec: JobSpec, work_dir: Path, shard: Shard, session: Any, target: Any, options: CompilerOptions,
                settings: CompilerSettings, timer: Timer, deadline: float | None) -> dict[str, Any]:
    """Tuning worker ``shard``: tune its share of the kernels into a database of its own, seeded with the shared
    records (so what is known is skipped), and upload it under :func:`tuning_prefix`."""
    from .tuning import TuningDatabase, shard_prefix
    from .tuning.database import RECORD_FILES

    own = TuningDatabase(work_dir / "shard-db")
    shared = open_tuning_database(settings.tuning_database, work_dir)
    if shared is not None:
        shared.download()
        for name in RECORD_FILES:
            if (shared.local_dir / name).exists():
                shutil.copyfile(shared.local_dir / name, own.local_dir / name)
    counts = tune_model(work_dir / "model", spec.framework, target, options, shard=shard, tuning_database=own,
                        data_input_config=spec.data_input_config, deadline=deadline, stage=timer.stage)
    own.repair()
    prefix = shard_prefix(tuning_prefix(spec), shard)
    with timer.stage("upload"):
        for name in RECORD_FILES:
            if (own.local_dir / name).exists():
                aws.upload(session, own.local_dir / name, f"{prefix}/{name}", spec.kms_key_id,
                           content_type="application/json")
    return {"Shard": str(shard), "Status": "COMPLETED", "Kernels": counts.get("kernels", 0),
            "Tuned": counts.get("tuned", 0), "Records": f"{prefix}/", "Timings": timer.timings}


def _gather_shards(spec: JobSpec, work_dir: Path, workers: int, session: Any, database: TuningDatabase) -> None:
    """The build of a fanned-out job: merge every worker's records into ``database`` (a worker that failed left
    none: its kernels keep their default schedules)."""
    from .tuning import TuningDatabase, merge_records, shard_prefix
    from .tuning.database import RECORD_FILES

    database.download()
    for index in range(1, workers + 1):
        shard = Shard(index, workers)
        local = work_dir / "workers" / shard.name
        local.mkdir(parents=True, exist_ok=True)
        prefix = shard_prefix(tuning_prefix(spec), shard)
        found = [aws.download_if_present(session, f"{prefix}/{name}", local / name) for name in RECORD_FILES]
        if not any(found):
            log.warning("tuning worker %s left no records; its kernels build with default schedules", shard)
            continue
        worker_db = TuningDatabase(local)
        worker_db.repair()
        database.recorded_by_workers |= merge_records(worker_db, database)


def run_job(spec: JobSpec, work_dir: Path, *, settings: CompilerSettings = CompilerSettings(),
            session_factory: Callable[[str, str], Any] = aws.assume_job_role,
            catalog: TargetCatalog | None = None, shard: Shard | None = None) -> dict[str, Any]:
    """Run the job: credentials -> download -> unpack -> compile_model -> package -> upload.

    As tuning worker ``shard`` of a fanned-out job: credentials -> download -> unpack -> load -> tune ->
    upload of its records (ADR 0023). Returns the success output; raises CompilationError subclasses on failure."""
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
    if options.quantize is not None and options.quantize.calibration.startswith("s3://"):
        with timer.stage("calibration"):  # read through the job's role, like the model (ADR 0027)
            fetched = aws.download_capped(session, options.quantize.calibration, work_dir / "calibration.npz",
                                          rules.MAX_CALIBRATION_BYTES, f"{rules.QUANTIZE_MEMBER}.calibration")
        options = replace(options, quantize=replace(options.quantize, fetched=fetched))
    if shard is not None:
        output = _tune_shard(spec, work_dir, shard, session, target, options, settings, timer, deadline)
        timer.timings["total"] = round(time.monotonic() - started, 3)
        return output
    database = open_tuning_database(settings.tuning_database, work_dir)
    if database is None and options.tuning is not None:  # no shared database: this job's own records
        from .tuning import TuningDatabase

        database = TuningDatabase(work_dir / "tuning-db")
    if database is not None and options.tuning is not None and options.tuning.workers > 1:
        with timer.stage("gather"):
            _gather_shards(spec, work_dir, options.tuning.workers, session, database)
        options = replace(options, tuning=None)  # the workers tuned; the build applies what they recorded
    result = compile_model(model_dir, spec.framework, target, options, out_dir=work_dir / "build",
                           data_input_config=spec.data_input_config, deadline=deadline, stage=timer.stage,
                           tuning_database=database)
    if database is not None and database.recorded_by_workers:
        try:
            database.upload()  # the shared database (S3) learns what the workers measured
        except Exception:
            log.exception("the merged tuning records could not be shared; the artifact is unaffected")
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

    qdq_file = result.qdq_model or accuracy.qdq_model_file(model_dir, result.model.framework,
                                                           result.model.model_files)

    def compare(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        from kiln import runtime

        try:
            runtime.check_host(manifest)
        except runtime.IncompatibleHostError as exc:
            return accuracy.not_measured(f"this runner cannot run the artifact: {exc}")
        assert qdq_file is not None
        with timer.stage("accuracy"):
            return accuracy.agreement(root, qdq_file)

    with timer.stage("package"):
        artifact = package(result, target, work_dir / "out" / name, model_dir=model_dir,
                           job_name=spec.name, labels_name=options.class_labels, profiler=measure,
                           accuracy=compare if qdq_file is not None else None)
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
        "Accuracy": artifact.manifest.get("accuracy"),
        "Precision": artifact.manifest.get("precision"),
    }
