#!/usr/bin/env python3
"""Kiln's CDK app: ``.venv/bin/python infra/app.py`` synthesizes cdk.out/ offline (no Docker, no AWS account).

With the CDK CLI: ``cd infra && npx aws-cdk@2 deploy`` (cdk.json runs this file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kiln_infra.app_factory import build_app  # noqa: E402
from kiln_infra.paths import REPO_ROOT  # noqa: E402


def main() -> None:
    outdir = os.environ.get("CDK_OUTDIR") or str(REPO_ROOT / "cdk.out")
    app, _ = build_app(outdir=outdir)
    app.synth()


if __name__ == "__main__":
    main()
