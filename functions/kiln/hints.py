"""What to do about a job's FailureReason: one table, used by ``kiln compile`` and the console."""

from __future__ import annotations

import re

# (pattern searched in the FailureReason, what the user can do), first match wins.
_FIXES: tuple[tuple[str, str], ...] = (
    (r"MaxPendingTimeInSeconds",
     "The compiler container did not start in time: raise StoppingCondition.MaxPendingTimeInSeconds, or check "
     "that the deployment has capacity (Fargate tasks / the GPU job queue)."),
    (r"MaxRuntimeInSeconds",
     "Raise StoppingCondition.MaxRuntimeInSeconds, or lower the tuning budget in CompilerOptions "
     "({\"tuning\": {\"minutes\": M}})."),
    (r"^ClientError: InputConfiguration: .*(DataInputConfig|shape)",
     "Give InputConfig.DataInputConfig with every input's name and shape, e.g. {\"data\": [1, 3, 224, 224]}."),
    (r"^ClientError: InputConfiguration: .*(S3|RoleArn|read the model)",
     "Check InputConfig.S3Uri and that the job's RoleArn may read it (s3:GetObject)."),
    (r"^ClientError: InputConfiguration:",
     "Fix the model archive or InputConfig as the reason says (one model file in a .tar.gz, the right "
     "Framework), upload it again and create a new job."),
    (r"^ClientError: OutputConfiguration: .*(S3|write)",
     "Check OutputConfig.S3OutputLocation and that the job's RoleArn may write there (s3:PutObject, KMS key)."),
    (r"^ClientError: OutputConfiguration:",
     "Fix OutputConfig (TargetDevice or TargetPlatform, CompilerOptions) as the reason says, and create a new job."),
    (r"^ClientError:",
     "The job's request or model is at fault: correct what the reason names and create a new job."),
    (r"^ServerError:",
     "Kiln failed, not your input: create the job again; if it fails again, report the job name and its "
     "compiler log to the operators of this Kiln."),
)


def suggest_fix(failure_reason: str | None) -> str | None:
    """What to do about ``failure_reason`` (None when there is none)."""
    if not failure_reason:
        return None
    for pattern, fix in _FIXES:
        if re.search(pattern, failure_reason, flags=re.IGNORECASE):
            return fix
    return "Correct what the reason names and create a new job."
