"""Build the CDK app (used by infra/app.py and by the tests, so both synthesize the same thing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aws_cdk import App, Environment
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


def build_app(context: dict[str, Any] | None = None, outdir: str | Path | None = None,
              nag: bool = True) -> tuple[App, KilnStack]:
    """The app with the Kiln stack, suppressions applied and (unless ``nag=False``) cdk-nag checks added."""
    merged = {**cdk_json_context(), **(context or {})}
    if "CDK_CONTEXT_JSON" in os.environ or "CDK_OUTDIR" in os.environ:  # run by the CDK CLI
        merged = dict(context or {})
    app = App(context=merged, outdir=str(outdir) if outdir else None)
    config = KilnConfig.from_context(app.node.try_get_context("kiln"))
    env = None
    account, region = os.environ.get("CDK_DEFAULT_ACCOUNT"), os.environ.get("CDK_DEFAULT_REGION")
    if account and region:
        env = Environment(account=account, region=region)
    stack = KilnStack(app, app.node.try_get_context("kiln:stackName") or STACK_NAME, config=config, env=env)
    apply_suppressions(stack)
    if nag:
        AwsSolutionsChecks(verbose=True).validate_scope(app)
    return app, stack
