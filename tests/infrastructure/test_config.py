"""KilnConfig: documented defaults from CDK context, refusing settings that cannot deploy."""

from __future__ import annotations

import json

import pytest
from kiln_infra.app_factory import cdk_json_context
from kiln_infra.config import KilnConfig
from pydantic import ValidationError


def test_defaults_are_the_documented_production_settings() -> None:
    # GIVEN no context at all
    config = KilnConfig.from_context(None)
    # THEN both runners, a created VPC, deletion protection, a year of logs and the default bus are used
    assert config.target_families == ("cpu", "gpu") and config.vpc is None
    assert config.deletion_protection and config.log_retention_days == 365
    assert config.event_bus_name == "default" and config.max_active_jobs == 20
    # AND cdk.json's kiln context changes none of them
    assert KilnConfig.from_context(cdk_json_context()["kiln"]) == config


def test_context_from_the_command_line_is_json() -> None:
    # GIVEN `cdk deploy -c kiln='{...}'` (a JSON string)
    config = KilnConfig.from_context(json.dumps({"max_active_jobs": 5, "target_families": ["cpu"]}))
    # THEN it is parsed into the model
    assert config.max_active_jobs == 5 and not config.gpu_enabled


@pytest.mark.parametrize("bad", [
    {"target_families": []},
    {"log_retention_days": 10},
    {"cpu_image_tag": "v1"},  # a prebuilt tag needs compiler_repository
    {"no_such_setting": 1},
    {"vpc": {"vpc_id": "vpc-0abc", "subnet_ids": ["subnet-1"], "availability_zones": []}},
    {"event_bus_name": "arn:aws:events:us-east-1:123456789012:event-bus/x"},
])
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    # GIVEN a setting that could not deploy  WHEN it is read  THEN synth stops with a validation error
    with pytest.raises(ValidationError):
        KilnConfig.from_context(bad)
