"""Fixtures of the infrastructure tests: the CDK app synthesized once per session (synth is slow)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from aws_cdk import App
from kiln_infra.app_factory import Finding, build_app, nag_findings
from kiln_infra.stack import KilnStack

ALARM_TOPIC = "arn:aws:sns:us-east-1:123456789012:kiln-operators"


@dataclass
class Synthesized:
    app: App
    stack: KilnStack
    template: dict[str, Any]
    template_path: Path

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        return self.template["Resources"]

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.resources.items() if v["Type"] == kind}

    def one(self, kind: str) -> tuple[str, dict[str, Any]]:
        found = self.of_type(kind)
        assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
        return next(iter(found.items()))


def _synth(outdir: Path, context: dict[str, Any] | None = None) -> Synthesized:
    import json

    app, stack = build_app(context=context, outdir=outdir)
    assembly = app.synth()
    path = Path(assembly.directory) / stack.template_file
    return Synthesized(app=app, stack=stack, template=json.loads(path.read_text()), template_path=path)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    """The default deployment (cdk.json context, KilnConfig defaults)."""
    return _synth(tmp_path_factory.mktemp("cdk-out"))


@pytest.fixture(scope="session")
def nag(synth: Synthesized) -> list[Finding]:
    """cdk-nag AwsSolutions findings left after the acknowledgements."""
    return nag_findings(synth.app)


@pytest.fixture(scope="session")
def nag_unacknowledged() -> Iterator[list[Finding]]:
    """cdk-nag findings of the same app with no acknowledgement applied (construct tree only, no synth)."""
    from kiln_infra import nag_suppressions

    saved = nag_suppressions.SUPPRESSIONS
    nag_suppressions.SUPPRESSIONS = ()
    try:
        app, _ = build_app()
        yield nag_findings(app)
    finally:
        nag_suppressions.SUPPRESSIONS = saved


@pytest.fixture(scope="session")
def synth_cpu_only_imported_vpc(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    """A deployment with GPU targets off, Graviton families on, into an existing VPC, with deletion protection
    off, alarms to a topic, no shared tuning database."""
    return _synth(tmp_path_factory.mktemp("cdk-out-cpu"), {"kiln": {
        "target_families": ["cpu"], "deletion_protection": False, "log_retention_days": 30,
        "shared_tuning_database": False,
        "cpu_instance_families": ["c5", "c6g", "c7g"],
        "alarm_topic_arn": ALARM_TOPIC, "alarm_failed_job_rate": 0.2,
        "vpc": {"vpc_id": "vpc-0123456789abcdef0", "subnet_ids": ["subnet-aaa", "subnet-bbb"],
                "availability_zones": ["us-east-1a", "us-east-1b"]}}})


def resolve(value: Any) -> str:
    """A CloudFormation value as a readable string: {"Ref": X} → <X>, GetAtt → <X.Attr>, Join → concatenation."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (fn, arg), = value.items()
        if fn == "Ref":
            return f"<{arg}>"
        if fn == "Fn::GetAtt":
            return f"<{arg[0]}.{arg[1]}>"
        if fn == "Fn::Join":
            return str(arg[0]).join(resolve(part) for part in arg[1])
        if fn == "Fn::Sub" and isinstance(arg, str):
            return arg.replace("${", "<").replace("}", ">")
    raise AssertionError(f"unexpected CloudFormation value {value!r}")


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    found = document.get("Statement", [])
    return found if isinstance(found, list) else [found]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
