"""The iam:PassRole check on create (moto has no SimulatePrincipalPolicy: botocore's Stubber stands in
for IAM and asserts the exact request Kiln sends)."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from kiln.errors import AccessDenied
from kiln.service import CompilationJobService, _principal_arn

ROLE = "arn:aws:iam::123456789012:role/kiln-job-resnet"


def _service(iam) -> CompilationJobService:
    return CompilationJobService(store=None, catalog=None, sfn=None, events=None,  # type: ignore[arg-type]
                                 containers=None, state_machine_arn="", region="us-east-1",
                                 account="123456789012", iam=iam)


@pytest.mark.parametrize(("caller", "principal"), [
    ("arn:aws:sts::123456789012:assumed-role/ci-deployer/session-1", "arn:aws:iam::123456789012:role/ci-deployer"),
    ("arn:aws:iam::123456789012:user/alice", "arn:aws:iam::123456789012:user/alice"),
])
def test_caller_is_simulated_as_its_iam_principal(caller: str, principal: str) -> None:
    # GIVEN IAM that allows the principal to pass the job role
    iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(iam) as stub:
        stub.add_response("simulate_principal_policy",
                          {"EvaluationResults": [{"EvalActionName": "iam:PassRole", "EvalDecision": "allowed"}]},
                          {"PolicySourceArn": principal, "ActionNames": ["iam:PassRole"], "ResourceArns": [ROLE]})
        # WHEN the check runs for the caller THEN it passes, having asked about the right principal
        _service(iam)._check_pass_role(caller, ROLE)
        stub.assert_no_pending_responses()
    assert _principal_arn(caller) == principal


def test_caller_who_may_not_pass_the_role_is_refused() -> None:
    # GIVEN IAM that denies the pass
    iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(iam) as stub:
        stub.add_response("simulate_principal_policy",
                          {"EvaluationResults": [{"EvalActionName": "iam:PassRole", "EvalDecision": "implicitDeny"}]})
        # WHEN the check runs THEN the caller gets AccessDenied naming the action and the role
        with pytest.raises(AccessDenied, match="not authorized to perform: iam:PassRole on resource: " + ROLE):
            _service(iam)._check_pass_role("arn:aws:iam::123456789012:user/mallory", ROLE)


def test_a_failed_simulation_refuses_rather_than_allows() -> None:
    # GIVEN IAM that cannot answer
    iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(iam) as stub:
        stub.add_client_error("simulate_principal_policy", "AccessDenied")
        # WHEN the check runs THEN the job is refused (fail closed)
        with pytest.raises(AccessDenied, match="Could not verify"):
            _service(iam)._check_pass_role("arn:aws:iam::123456789012:user/bob", ROLE)
