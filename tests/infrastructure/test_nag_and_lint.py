"""cdk-nag AwsSolutions (every acknowledgement scoped, explained, and still needed) and cfn-lint."""

from __future__ import annotations

import cfnlint.api
from kiln_infra.app_factory import Finding
from kiln_infra.nag_suppressions import SUPPRESSIONS, find

from .conftest import Synthesized


def test_no_unacknowledged_nag_errors_or_warnings(nag: list[Finding]) -> None:
    # GIVEN the cdk-nag AwsSolutions findings left after the acknowledgements
    # THEN there are none: no error, and every warning was reviewed and acknowledged
    assert nag == [], "\n".join(f"{f.severity} {f.path} {f.rule}" for f in nag)


def test_each_acknowledgement_names_a_real_resource(synth: Synthesized) -> None:
    # GIVEN the acknowledgements
    for suppression in SUPPRESSIONS:
        construct = find(synth.stack, suppression.path)
        # THEN each names one CloudFormation resource of the default deployment, with a real reason
        assert construct is not None, suppression.path
        assert construct.node.id in ("Resource", "Default") or suppression.path.endswith("/Resource"), suppression.path
        assert len(suppression.reason) >= 40, suppression
    # AND none is repeated
    keys = [(s.path, s.finding) for s in SUPPRESSIONS]
    assert len(keys) == len(set(keys))


def test_each_acknowledgement_matches_a_finding(nag_unacknowledged: list[Finding]) -> None:
    # GIVEN the findings cdk-nag reports when nothing is acknowledged
    reported = {(f.path.removeprefix("Kiln/"), f.rule) for f in nag_unacknowledged}
    # THEN every acknowledgement is for exactly one of them (same resource, same finding)
    stale = [(s.path, s.finding) for s in SUPPRESSIONS if (s.path, s.finding) not in reported]
    assert not stale, stale
    # AND none of them is a blanket rule id for a per-finding rule (IAM4/IAM5 need the exact string)
    assert all("[" in s.finding for s in SUPPRESSIONS if s.finding.split("[")[0] in ("AwsSolutions-IAM4",
                                                                                     "AwsSolutions-IAM5"))


def test_cfn_lint_finds_no_errors(synth: Synthesized) -> None:
    # GIVEN the synthesized template
    # WHEN cfn-lint checks it (every region Kiln documents)
    matches = cfnlint.api.lint_file(synth.template_path, config=cfnlint.api.ManualArgs(
        regions=["us-east-1", "eu-west-1"]))
    # THEN it reports no error (warnings: only CDK's redundant DependsOn, W3005)
    errors = [m for m in matches if m.rule.id.startswith("E")]
    assert not errors, "\n".join(str(m) for m in errors)
    assert {m.rule.id for m in matches} <= {"W3005"}, sorted({str(m) for m in matches})
