"""Least privilege: no wildcard actions anywhere; '*' resources only where AWS requires them."""

from __future__ import annotations

from typing import Any

from .conftest import Synthesized, as_list, resolve, statements

# Every Allow statement with Resource "*", as (owner prefix, actions) → why AWS requires it.
# The owner is the logical ID of the policy's role (IAM policies) or of the KMS key (key policies).
STAR_RESOURCE_ALLOWED: dict[tuple[str, frozenset[str]], str] = {
    **{(role, frozenset({"xray:PutTraceSegments", "xray:PutTelemetryRecords"})):
       "X-Ray has no resource-level permissions (Lambda active tracing)"
       for role in ("ApiFunctionRole", "WorkflowFunctionsStepsRole", "WorkflowFunctionsContainerStoppedRole",
                    "RegistryFunctionRole")},
    **{(role, frozenset({"ecs:ListTasks"})):
       "ecs:ListTasks has no resource-level permissions; the statement is pinned to Kiln's cluster by ecs:cluster"
       for role in ("ApiFunctionRole", "WorkflowFunctionsStepsRole")},
    **{(role, frozenset({"batch:ListJobs", "batch:DescribeJobs"})):
       "batch:ListJobs and DescribeJobs have no resource-level permissions"
       for role in ("ApiFunctionRole", "WorkflowFunctionsStepsRole")},
    ("CompilationWorkflowStateMachineRole", frozenset({"batch:DescribeJobs"})):
        "batch:DescribeJobs has no resource-level permissions",
    ("CompilationWorkflowStateMachineRole", frozenset({
        "logs:CreateLogDelivery", "logs:GetLogDelivery", "logs:UpdateLogDelivery", "logs:DeleteLogDelivery",
        "logs:ListLogDeliveries", "logs:PutResourcePolicy", "logs:DescribeResourcePolicies",
        "logs:DescribeLogGroups"})):
        "CloudWatch Logs vended-log delivery of Step Functions requires '*'",
    ("CompilationWorkflowStateMachineRole", frozenset({
        "xray:PutTraceSegments", "xray:PutTelemetryRecords", "xray:GetSamplingRules", "xray:GetSamplingTargets"})):
        "X-Ray has no resource-level permissions (state machine tracing)",
    **{(role, frozenset({"ecr:GetAuthorizationToken"})): "ecr:GetAuthorizationToken has no resource-level permissions"
       for role in ("CompilerRunnersCpuTaskExecutionRole", "CompilerRunnersGpuContainerExecutionRole",
                    "CompilerRunnersCpuFamilyExecutionRole")},
    # Key policies: "*" is the key itself.
    ("KilnKey", frozenset({"kms:*"})):
        "the default key policy: the account root delegates use of the key to IAM policies (avoids an "
        "unmanageable key); the only wildcard action in the stack",
    ("KilnKey", frozenset({"kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo",
                           "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey"})):
        "CloudWatch Logs encrypts Kiln's log groups (condition: this account's log groups)",
    ("KilnKey", frozenset({"kms:Decrypt", "kms:GenerateDataKey"})):
        "EventBridge writes undeliverable events to the encrypted dead-letter queue (condition: this account)",
    ("KilnKey", frozenset({"kms:Decrypt", "kms:Encrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*"})):
        "added by CDK for the pagination secret: principals of the account, only via Secrets Manager "
        "(kms:ViaService condition)",
    ("KilnKey", frozenset({"kms:CreateGrant", "kms:DescribeKey"})):
        "added by CDK for the pagination secret: Secrets Manager's grant on the key (kms:ViaService condition)",
}
WILDCARD_ACTION_ALLOWED = {("KilnKey", "kms:*")}


def _allow_statements(synth: Synthesized) -> list[tuple[str, dict[str, Any]]]:
    """(owner logical ID, statement) of every Allow statement in IAM policies, role inline policies, key policies."""
    found: list[tuple[str, dict[str, Any]]] = []
    for logical_id, resource in synth.resources.items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Policy":
            for role in props.get("Roles", []):
                found += [(role["Ref"], s) for s in statements(props["PolicyDocument"])]
        elif resource["Type"] == "AWS::IAM::Role":
            for policy in props.get("Policies", []):
                found += [(logical_id, s) for s in statements(policy["PolicyDocument"])]
        elif resource["Type"] == "AWS::KMS::Key":
            found += [(logical_id, s) for s in statements(props["KeyPolicy"])]
        elif resource["Type"] == "AWS::IAM::ManagedPolicy":
            found += [(logical_id, s) for s in statements(props["PolicyDocument"])]
    return [(owner, s) for owner, s in found if s["Effect"] == "Allow"]


def _owner_key(owner: str) -> str:
    """The logical ID without CDK's 8-character hash suffix."""
    return owner[:-8]


def test_no_statement_allows_all_actions_of_a_service(synth: Synthesized) -> None:
    # GIVEN every Allow statement of the stack
    for owner, statement in _allow_statements(synth):
        # THEN no action is "*" or "service:*" (nor NotAction), except the key policy's root statement
        assert "NotAction" not in statement, owner
        for action in as_list(statement["Action"]):
            if action == "*" or action.endswith(":*"):
                assert (_owner_key(owner), action) in WILDCARD_ACTION_ALLOWED, (owner, action)


def test_star_resources_only_where_aws_requires_them(synth: Synthesized) -> None:
    # GIVEN every Allow statement with a "*" resource
    seen = set()
    for owner, statement in _allow_statements(synth):
        resources = [resolve(r) for r in as_list(statement.get("Resource", []))]
        if "*" not in resources:
            continue
        key = (_owner_key(owner), frozenset(as_list(statement["Action"])))
        # THEN it is one of the explained cases, alone in its statement
        assert key in STAR_RESOURCE_ALLOWED, f"'*' resource not allowed for {owner}: {sorted(key[1])}"
        assert resources == ["*"], owner
        seen.add(key)
    # AND every explained case still exists (the allow-list does not rot)
    assert seen == set(STAR_RESOURCE_ALLOWED), sorted(set(STAR_RESOURCE_ALLOWED) - seen)


def test_no_statement_grants_full_access_to_a_resource_family(synth: Synthesized) -> None:
    # GIVEN every Allow statement's resources
    for owner, statement in _allow_statements(synth):
        for resource in as_list(statement.get("Resource", [])):
            text = resolve(resource)
            # THEN no ARN wildcards the service or account part ("arn:aws:*", "::*:")
            assert not text.startswith("arn:*") and ":*:" not in text, (owner, text)


def test_one_role_per_function_and_no_managed_policies(synth: Synthesized) -> None:
    # GIVEN the Lambda functions
    functions = synth.of_type("AWS::Lambda::Function")
    roles = [f["Properties"]["Role"]["Fn::GetAtt"][0] for f in functions.values()]
    # THEN each has a role of its own, without AWS managed policies
    assert len(functions) == 4 and len(set(roles)) == len(roles)
    for role in roles:
        assert "ManagedPolicyArns" not in synth.resources[role]["Properties"], role
