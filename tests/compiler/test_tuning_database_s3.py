"""The shared tuning database on S3 (KILN_TUNING_DB=s3://..., as the CDK app sets it per runner), on moto:
fanned-out tuning workers' records meet in it through the build, and the next job on that runner reuses them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kiln_compiler.job import CompilerSettings, JobSpec, run_job, tuning_prefix
from kiln_compiler.options import Shard
from kiln_compiler.profile import ProfileMode, ProfileSettings

from tests.workflow.conftest import dense_chain_onnx

from .conftest import entrypoint_job

tvm = pytest.importorskip("tvm")
from kiln_compiler.tuning import TuningDatabase  # noqa: E402

TUNING_BUCKET = "kiln-tuning-records"
LOCATION = f"s3://{TUNING_BUCKET}/records/batch-c4"  # what CompilerRunners sets for ml_c4's runner
DIMS = (24, 40, 8)  # two dense layers of distinct shapes: two kernels (one per worker), tuned by no other test
# Each worker's budget (a time budget: a trial count does not bound MetaSchedule's search time on a loaded host):
# enough on a loaded 2-core host for Kiln's measured tiles of the worker's one kernel.
BUDGET_MINUTES = 1.0
SETTINGS = CompilerSettings(tuning_database=LOCATION, runner="batch-c4", profile=ProfileSettings(mode=ProfileMode.OFF))


def _spec(name: str, options: dict[str, Any] | None) -> JobSpec:
    job = entrypoint_job(name, f"s3://user-models/{name}/model.tar.gz")
    job["InputConfig"]["DataInputConfig"] = json.dumps({"x": [1, DIMS[0]]})
    if options is not None:
        job["OutputConfig"]["CompilerOptions"] = json.dumps(options)
    return JobSpec.parse(json.dumps(job))


def _work_dir(tmp_path: Path, name: str) -> Path:
    """A container's own work directory (KILN_WORK_DIR)."""
    (tmp_path / name).mkdir()
    return tmp_path / name


def _workloads(db: TuningDatabase) -> set[int]:
    """Structural hashes of the workloads ``db`` holds records for (MetaSchedule's and Kiln's)."""
    import tvm_ffi

    return {tvm_ffi.structural_hash(record.workload.mod) for open_db in (db.open_search, db.open_kiln)
            for record in open_db().get_all_tuning_records()}


def _worker_workloads(s3: Any, spec: JobSpec, shard: Shard, into: Path) -> set[int]:
    """The workloads worker ``shard`` left records for under the job's prefix (as the build finds them)."""
    from kiln_compiler.tuning import shard_prefix
    from kiln_compiler.tuning.database import RECORD_FILES

    bucket, prefix = shard_prefix(tuning_prefix(spec), shard)[len("s3://"):].split("/", 1)
    into.mkdir(parents=True)
    for name in RECORD_FILES:
        s3.download_file(bucket, f"{prefix}/{name}", str(into / name))
    return _workloads(TuningDatabase(into))


@pytest.mark.slow
def test_workers_records_meet_in_the_shared_s3_database_and_the_next_job_reuses_them(buckets: Any,
                                                                                     tmp_path: Path) -> None:
    # GIVEN the shared tuning database in its own bucket (empty) and a model of three dense layers
    s3 = buckets
    s3.create_bucket(Bucket=TUNING_BUCKET)
    s3.put_object(Bucket="user-models", Key="fanout/model.tar.gz", Body=dense_chain_onnx(DIMS))
    spec = _spec("fanout", {"tuning": {"minutes": BUDGET_MINUTES, "workers": 2}})

    # WHEN the job's two tuning workers run, each in its own container (work dir), then its build
    workers = [run_job(spec, _work_dir(tmp_path, f"worker-{i}"), settings=SETTINGS, shard=Shard(i, 2)) for i in (1, 2)]
    build = run_job(spec, _work_dir(tmp_path, "build"), settings=SETTINGS)

    # THEN each worker tuned a share of its own, disjoint from the other's
    assert [w["Status"] for w in workers] == ["COMPLETED", "COMPLETED"]
    assert sum(w["Kernels"] for w in workers) == len(DIMS) - 1 and all(w["Tuned"] >= 1 for w in workers), workers
    shares = [_worker_workloads(s3, spec, Shard(i, 2), tmp_path / f"records-{i}") for i in (1, 2)]
    assert all(shares) and not shares[0] & shares[1]
    # AND the build applied both workers' records (counted as tuned, not reused)
    assert build["Tuning"]["tuned"] == sum(w["Tuned"] for w in workers)
    # AND the shared database on S3 now holds both workers' records: a fresh reader (another container) finds them
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=TUNING_BUCKET)["Contents"]}
    assert "records/batch-c4/kiln_tuning_record.json" in listed
    reader = TuningDatabase(LOCATION, cache_dir=tmp_path / "reader")
    reader.download()
    assert shares[0] | shares[1] <= _workloads(reader)

    # WHEN a second job of the same model on the same runner compiles without any tuning budget
    s3.put_object(Bucket="user-models", Key="again/model.tar.gz", Body=dense_chain_onnx(DIMS))
    again = run_job(_spec("again", None), _work_dir(tmp_path, "again"), settings=SETTINGS)
    # THEN it tunes nothing and takes every kernel the workers tuned from the shared database
    assert again["Tuning"]["tuned"] == 0
    assert again["Tuning"]["reused"] >= build["Tuning"]["tuned"] >= 2
