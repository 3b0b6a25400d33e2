"""Where a job's artifact is measured: on its target's own hardware (deployed) or on any host that runs it (local)."""

from __future__ import annotations

from typing import Any

import pytest
from kiln.catalog import Runner, TargetCatalog
from kiln.runtime import host_machine
from kiln_compiler.profile import ProfileMode, ProfileSettings, why_not

CATALOG = TargetCatalog()
DEPLOYED = ProfileSettings(mode=ProfileMode.RUNNER)


def _manifest(device: str, machine: str) -> dict[str, Any]:
    target = CATALOG.device(device)
    return {"target": {"name": device, "family": str(target.family), "machine": machine, "isa": []}}


def test_edge_target_on_the_generic_runner_is_not_measured() -> None:
    # GIVEN an x86 edge device (DeepLens) built on the generic Fargate runner, whose CPU could run it
    # WHEN the deployed policy decides  THEN no measurement: Fargate is not DeepLens hardware
    reason = why_not(CATALOG.device("deeplens"), _manifest("deeplens", "x86_64"), DEPLOYED, "fargate", 600)
    assert reason and "cross or edge target" in reason and "no measurement was possible" in reason


def test_cloud_target_on_its_own_family_is_measured_and_elsewhere_not() -> None:
    # GIVEN ml_c4 (AVX2, which this host has) built on its own batch-c4 runner, or on another family's
    target = CATALOG.device("ml_c4")
    # THEN it is measured on batch-c4 only; elsewhere the reason names both families
    assert why_not(target, _manifest("ml_c4", "x86_64"), DEPLOYED, str(Runner.BATCH_C4), 600) is None
    other = why_not(target, _manifest("ml_c4", "x86_64"), DEPLOYED, str(Runner.BATCH_C5), 600)
    assert other and "c5 instances" in other and "(c4)" in other
    assert "not known" in (why_not(target, _manifest("ml_c4", "x86_64"), DEPLOYED, None, 600) or "")


def test_host_policy_measures_what_the_host_runs_and_says_why_not_otherwise() -> None:
    # GIVEN local mode's policy (any host that can run the artifact)
    local = ProfileSettings(mode=ProfileMode.HOST)
    # THEN an artifact of this host's machine is measured whatever the runner, a foreign machine's is refused
    # with check_host's reason, and too little time left is a reason too
    here, foreign = ("x86_64", "aarch64") if host_machine() == "x86_64" else ("aarch64", "x86_64")
    assert why_not(CATALOG.device("deeplens"), _manifest("deeplens", here), local, "local", 600) is None
    refused = why_not(CATALOG.device("deeplens"), _manifest("deeplens", foreign), local, "local", 600)
    assert refused and f"needs a {foreign} machine" in refused
    assert "left after the build" in (why_not(CATALOG.device("ml_c4"), _manifest("ml_c4", "x86_64"), local,
                                              "local", 0.5) or "")
    off = why_not(CATALOG.device("ml_c4"), _manifest("ml_c4", "x86_64"), ProfileSettings(mode=ProfileMode.OFF),
                  "local", 600)
    assert off and "KILN_PROFILE=off" in off


def test_profile_settings_from_the_environment() -> None:
    # GIVEN the container environment  THEN KILN_PROFILE picks the mode, bad values are refused by name
    assert ProfileSettings.from_env({}).mode is ProfileMode.RUNNER
    assert ProfileSettings.from_env({"KILN_PROFILE": "host", "KILN_PROFILE_RUNS": "5"}).runs == 5
    with pytest.raises(ValueError, match="KILN_PROFILE"):
        ProfileSettings.from_env({"KILN_PROFILE": "sometimes"})


@pytest.mark.parametrize(("body", "timeout", "expected"), [
    ('print("warming up"); print(\'{"median_ms": 1.5}\')', 30, {"median_ms": 1.5}),
    ('import sys; sys.exit("the artifact needs avx512f")', 30, "the artifact needs avx512f"),
    ("import time; time.sleep(30)", 1, "timeout"),
])
def test_measuring_child_gives_its_last_json_line_or_why_not(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                             body: str, timeout: float, expected: Any) -> None:
    # GIVEN a measuring module that reports, crashes or hangs
    from kiln_compiler.profile import run_measuring_child

    (tmp_path / "kiln_probe.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    # WHEN it runs as a child  THEN its JSON result, the reason it gave, or "timeout"
    assert run_measuring_child(["kiln_probe"], timeout) == expected
