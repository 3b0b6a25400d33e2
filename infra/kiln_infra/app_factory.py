"""Build the CDK app (infra/app.py and the tests use this, so both synthesize the same thing)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aws_cdk import App
from cdk_nag import AwsSolutionsChecks

from kiln_infra.config import KilnConfig
from kiln_infra.nag_suppressions import apply_suppressions
from kiln_infra.paths import REPO_ROOT
from kiln_infra.stack import KilnStack

CDK_JSON = REPO_ROOT / "infra" / "cdk.json"
STACK_NAME = "Kiln"


def cdk_json_context() -> dict[str, Any]:
    """The ``context`` of infra/cdk.json (the CDK CLI passes it itself; plain ``python app.py`` does not)."""
    context: dict[str, Any] = json.loads(CDK_JSON.read_text()).get("context", {})
    return context


def build_app(context: dict[str, Any] | None = None, outdir: str | Path | None = None) -> tuple[App, KilnStack]:
    """The app with the Kiln stack and its nag acknowledgements (cdk.json context + ``context``)."""
    cli = "CDK_CONTEXT_JSON" in os.environ  # the CDK CLI passes cdk.json's context itself
    app = App(context=dict(context or {}) if cli else {**cdk_json_context(), **(context or {})},
              outdir=str(outdir) if outdir else None)
    config = KilnConfig.from_context(app.node.try_get_context("kiln"))
    # Environment-agnostic on purpose: no lookups, the same template for every account/region
    # (and the same IAM strings the nag acknowledgements name). The CLI picks account/region at deploy.
    stack = KilnStack(app, STACK_NAME, config=config)
    apply_suppressions(stack)
    return app, stack


@dataclass(frozen=True)
class Finding:
    rule: str  # e.g. "AwsSolutions-IAM5[Resource::*]"
    severity: str  # "error" | "warning" ...
    path: str  # construct path
    description: str


def nag_findings(app: App) -> list[Finding]:
    """Unacknowledged cdk-nag AwsSolutions findings of the app."""
    report = AwsSolutionsChecks(verbose=False).validate_scope(app)
    return [Finding(rule=v.rule_name, severity=str(v.severity), path=r.construct_path or r.resource_logical_id or "",
                    description=v.description)
            for v in report.violations for r in v.violating_resources]
