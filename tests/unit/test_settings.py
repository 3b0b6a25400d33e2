"""KilnSettings: deployment settings are required (no local defaults outside local mode); a Lambda
started without them fails its cold start naming each missing variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kiln.config import KilnSettings, SettingsError

from tests.unit.conftest import COMPLETE

REPO = Path(__file__).resolve().parents[2]
HANDLERS = ("kiln.handlers.api", "kiln.handlers.workflow", "kiln.handlers.registry")


def _without_kiln_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    return {**env, **extra}


def _import_handlers(env: dict[str, str]) -> dict[str, str]:
    """Import each Lambda handler module in a fresh interpreter: module -> "ok" or the error."""
    script = (
        "import importlib, json\n"
        "out = {}\n"
        f"for name in {HANDLERS!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        from kiln import wiring\n"
        "        out[name] = 'ok:' + wiring.current().settings.table_name\n"
        "    except Exception as exc:\n"
        "        out[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_lambda_without_deployment_settings_fails_at_start_naming_them() -> None:
    # GIVEN a Lambda environment (AWS_LAMBDA_FUNCTION_NAME set) without any KILN_* setting
    env = _without_kiln_env({"AWS_LAMBDA_FUNCTION_NAME": "kiln-api", "AWS_REGION": "eu-west-1"})
    # WHEN each handler module is imported (the cold start)
    outcomes = _import_handlers(env)
    # THEN each fails with SettingsError naming every missing variable and the function
    for outcome in outcomes.values():
        assert outcome.startswith("SettingsError: Kiln cannot start in Lambda function kiln-api")
        for variable in ("KILN_ACCOUNT_ID", "KILN_TABLE_NAME", "KILN_STATE_MACHINE_ARN", "KILN_PAGINATION_KEY",
                         "KILN_ECS_CLUSTER", "KILN_GPU_JOB_QUEUE"):
            assert variable in outcome


def test_lambda_with_its_settings_starts_on_them() -> None:
    # GIVEN a Lambda environment with every deployment setting
    env = _without_kiln_env({**COMPLETE, "AWS_LAMBDA_FUNCTION_NAME": "kiln-workflow"})
    # WHEN the handlers are imported / THEN they start on the deployment's table
    assert set(_import_handlers(env).values()) == {"ok:kiln-jobs-prod"}


def test_no_local_default_for_the_token_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a deployment whose settings lack only the pagination key
    for key, value in COMPLETE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KILN_PAGINATION_KEY")
    # WHEN the settings are read / THEN they are refused, naming the key's variable alone
    with pytest.raises(SettingsError) as refused:
        KilnSettings.from_environment()
    assert str(refused.value).endswith("required settings are not set: KILN_PAGINATION_KEY")


def test_runner_settings_are_required_only_for_enabled_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a CPU-only deployment (no GPU job queue)
    for key, value in COMPLETE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KILN_GPU_JOB_QUEUE")
    monkeypatch.setenv("KILN_ENABLED_RUNNERS", "fargate")
    # WHEN read / THEN accepted, with the runner set and the region from AWS_REGION
    settings = KilnSettings.from_environment()
    assert settings.runners() == frozenset({"fargate"}) and settings.region == "eu-west-1"
    # AND enabling the GPU runner without its queue is refused, naming it
    monkeypatch.setenv("KILN_ENABLED_RUNNERS", "fargate,batch-gpu")
    with pytest.raises(SettingsError, match="KILN_GPU_JOB_QUEUE"):
        KilnSettings.from_environment()


def test_malformed_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a complete deployment with a non-numeric active-job limit
    for key, value in COMPLETE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KILN_MAX_ACTIVE_JOBS", "twenty")
    # WHEN read / THEN the error names the variable
    with pytest.raises(SettingsError, match="KILN_MAX_ACTIVE_JOBS: Input should be a valid integer"):
        KilnSettings.from_environment()
