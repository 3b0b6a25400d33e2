#!/usr/bin/env python3
"""Kiln's CDK app: ``.venv/bin/python infra/app.py`` synthesizes cdk.out/ offline (no Docker, no AWS account)
and fails if cdk-nag (AwsSolutions) reports an unacknowledged error.

With the CDK CLI (for deploy): ``cd infra && npx aws-cdk@2 deploy`` (cdk.json runs this file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kiln_infra.app_factory import build_app, nag_findings
from kiln_infra.paths import REPO_ROOT


def main() -> int:
    outdir = os.environ.get("CDK_OUTDIR") or str(REPO_ROOT / "cdk.out")
    app, _ = build_app(outdir=outdir)
    assembly = app.synth()
    findings = nag_findings(app)
    for finding in findings:
        print(f"[{finding.severity}] {finding.path}: {finding.rule} {finding.description}", file=sys.stderr)
    errors = [f for f in findings if "error" in f.severity.lower()]
    print(f"synthesized {assembly.directory}: {len(errors)} cdk-nag error(s), "
          f"{len(findings) - len(errors)} warning(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
