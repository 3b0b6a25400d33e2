"""Local mode runs at most ``max_compilers`` compiler processes at once; the others wait as tasks wait
for Fargate capacity, their pending time counting against MaxPendingTimeInSeconds."""

from __future__ import annotations

import os
from typing import Any

from tests.conftest import tar_gz
from tests.workflow.conftest import wait_until


def _queued(runner: Any) -> list[str]:
    return [env["KILN_JOB"] for _, env in list(runner.queued)]


def test_second_job_waits_for_the_slot_then_completes(local_stack: Any, service: Any, job_request: Any,
                                                      upload_model: Any, tiny_onnx_archive: bytes,
                                                      one_compiler_slot: Any) -> None:
    # GIVEN one compiler slot and two jobs of a tiny real model
    names = ["slot-first", "slot-second"]
    for name in names:
        upload_model(f"{name}/model.tar.gz", tiny_onnx_archive)
    # (compilers of earlier tests have ended, so the one slot is free)
    assert wait_until(lambda: one_compiler_slot.running() == 0, timeout=180)
    # WHEN both are created while no capacity is free, then the one slot opens
    one_compiler_slot.set_capacity(0)
    for name in names:
        service.create(job_request(name))
    assert wait_until(lambda: len([j for j in _queued(one_compiler_slot) if '"slot-' in j]) == 2, timeout=60)
    one_compiler_slot.set_capacity(1)
    # THEN one compiles while the other waits for the slot, still active
    waiting = [n for n in names if any(f'"{n}"' in j for j in _queued(one_compiler_slot))]
    assert one_compiler_slot.running() == 1 and len(waiting) == 1
    first = next(n for n in names if n not in waiting)
    assert service.describe(waiting[0])["CompilationJobStatus"] not in ("COMPLETED", "FAILED", "STOPPED")
    # AND the running compiler has a lower CPU priority than the API's process
    [running] = [p for p in one_compiler_slot.processes.values() if f'"{first}"' in p.env["KILN_JOB"]]
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, running.popen.pid) == min(own + 10, 19)
    # AND both complete, never more than one compiler running at once
    jobs = {name: local_stack.wait_for(name, timeout=240) for name in names}
    assert [job["CompilationJobStatus"] for job in jobs.values()] == ["COMPLETED", "COMPLETED"], [
        job.get("FailureReason") for job in jobs.values()]
    assert one_compiler_slot.peak_running == 1
    # AND the waiting one finished after the other (it compiled in the slot the other freed)
    assert jobs[waiting[0]]["CompilationEndTime"] > jobs[first]["CompilationEndTime"]


def test_pending_limit_fires_while_waiting_for_a_slot(local_stack: Any, service: Any, job_request: Any,
                                                     upload_model: Any, start_with_limits: Any,
                                                     one_compiler_slot: Any) -> None:
    # GIVEN one compiler slot taken by a long compilation (a randomized ResNet-50)
    from tests.compiler.conftest import randomized_light_model

    upload_model("slot-busy/model.tar.gz", tar_gz({"model.onnx": randomized_light_model("resnet50").SerializeToString()}))
    busy = job_request("slot-busy", InputConfig={
        "S3Uri": f"s3://{local_stack.outputs['ModelBucket']}/slot-busy/model.tar.gz", "Framework": "ONNX"})
    service.create(busy)
    assert wait_until(lambda: one_compiler_slot.running() == 1 and not one_compiler_slot.queued, timeout=60)
    try:
        # WHEN a job with MaxPendingTimeInSeconds = 3 has to wait for the slot
        start_with_limits(job_request("slot-pending"), pending=3, runtime=60)
        job = local_stack.wait_for("slot-pending", timeout=60)
        # THEN it fails with the same reason as any pending timeout, and its compiler never started
        assert job["CompilationJobStatus"] == "FAILED"
        assert job["FailureReason"] == ("ClientError: the compiler container did not start, or stopped "
                                        "responding, within MaxPendingTimeInSeconds (3 s)")
        assert not any('"slot-pending"' in p.env["KILN_JOB"] for p in one_compiler_slot.processes.values())
        assert not any('"slot-pending"' in queued for queued in _queued(one_compiler_slot))
    finally:
        service.stop("slot-busy")
    assert local_stack.wait_for("slot-busy", timeout=60)["CompilationJobStatus"] == "STOPPED"


def test_a_closed_runner_starts_no_compiler(tmp_path: Any) -> None:
    # GIVEN a runner with no free slot and one task waiting for it
    import json

    from kiln.local.stack import LocalContainerRunner

    runner = LocalContainerRunner("http://127.0.0.1:9", tmp_path, max_running=0)
    job = {"KILN_JOB": json.dumps({"CompilationJobName": "closed-a"})}
    runner.start("arn:aws:ecs:us-east-1:123456789012:task/kiln/a", job)
    assert len(runner.queued) == 1
    # WHEN it is closed (the stack stopping), then slots open and another task is asked for
    runner.close(grace=1)
    runner.set_capacity(2)
    runner.start("arn:aws:ecs:us-east-1:123456789012:task/kiln/b", {"KILN_JOB": json.dumps({"CompilationJobName": "b"})})
    # THEN neither starts nor waits: nothing would stop a compiler started now
    assert not runner.queued and not runner.processes and runner.running() == 0
