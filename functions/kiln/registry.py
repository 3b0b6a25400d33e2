"""Model registry hooks: compile approved model packages, write the compiled variants back.

Two EventBridge events drive this module (schemas in docs/events.md and docs/registry.md):

* ``aws.sagemaker`` / ``SageMaker Model Package State Change``: when a package version is
  ``Approved``, :meth:`RegistryHook.on_model_package_event` creates one compilation job per target
  listed in the package group's ``kiln:targets`` tag (or the deployment's default targets),
  through the same create path as the API. Job names are deterministic per (package version,
  target), so a redelivered event creates nothing new.
* ``kiln`` / ``Compilation Job State Change`` with status ``COMPLETED``: for a job the hook
  started, :meth:`RegistryHook.on_job_state_change` adds the artifact to the model package as an
  additional inference specification named after the target, and tags the job with the
  package ARN.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import botocore.session
from botocore.exceptions import ClientError

from kiln.catalog import Target, TargetCatalog, UnsupportedTargetError
from kiln.config import KilnSettings
from kiln.errors import ResourceInUse, ResourceNotFound, ValidationError, error_code, is_retryable
from kiln.events import DETAIL_TYPE as JOB_DETAIL_TYPE
from kiln.events import EVENT_SOURCE as JOB_EVENT_SOURCE
from kiln.service import CompilationJobService

log = logging.getLogger(__name__)

TARGETS_TAG = "kiln:targets"
PACKAGE_ARN_TAG = "kiln:model-package-arn"
SOURCE_TAG = "kiln:source"
TARGET_TAG = "kiln:target"
SPECIFICATION_TAG = "kiln:registry-specification"
SOURCE_REGISTRY = "registry"

PACKAGE_EVENT_SOURCE = "aws.sagemaker"
PACKAGE_DETAIL_TYPE = "SageMaker Model Package State Change"

# The EventBridge rules that feed the registry function (CDK and the local stack use these).
MODEL_PACKAGE_EVENT_PATTERN: dict[str, Any] = {
    "source": [PACKAGE_EVENT_SOURCE], "detail-type": [PACKAGE_DETAIL_TYPE]}
JOB_COMPLETED_EVENT_PATTERN: dict[str, Any] = {
    "source": [JOB_EVENT_SOURCE], "detail-type": [JOB_DETAIL_TYPE],
    "detail": {"CompilationJobStatus": ["COMPLETED"]}}

MAX_ADDITIONAL_SPECIFICATIONS = 15  # SageMaker's limit per model package
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


class RetryLater(Exception):
    """Some work failed transiently; raising makes Lambda/EventBridge redeliver the event
    (safe: job names are deterministic and the write-back is idempotent)."""


@dataclass(frozen=True)
class RegistryConfig:
    """Where registry-started jobs write, with which role and limits."""

    output_s3: str
    role_arn: str
    default_targets: str = ""
    max_runtime_seconds: int = 900
    inference_image: str = ""

    @classmethod
    def from_settings(cls, config: KilnSettings) -> RegistryConfig:
        return cls(output_s3=config.registry_output_s3, role_arn=config.registry_role_arn,
                   default_targets=config.registry_default_targets,
                   max_runtime_seconds=config.registry_max_runtime_seconds,
                   inference_image=config.inference_image)


@dataclass(frozen=True)
class TargetSpec:
    """One entry of ``kiln:targets``: a TargetDevice, or a TargetPlatform written ``OS/ARCH[/ACC]``."""

    text: str
    device: str | None = None
    platform: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TargetSpec:
        if "/" not in text:
            return cls(text, device=text)
        parts = tuple(p.strip().upper() for p in text.split("/"))
        return cls(text, platform=parts)

    @property
    def key(self) -> str:
        """The catalog key: ``ml_c4`` or ``LINUX_ARM64_NVIDIA``."""
        return self.device or "_".join(self.platform)

    def output_config(self) -> dict[str, Any]:
        if self.device:
            return {"TargetDevice": self.device}
        platform = {"Os": self.platform[0], "Arch": self.platform[1]}
        if len(self.platform) == 3:
            platform["Accelerator"] = self.platform[2]
        return {"TargetPlatform": platform}

    def resolve(self, catalog: TargetCatalog) -> Target:
        """The catalog target; ``UnsupportedTargetError`` (with ``.reason``) when unknown or refused."""
        if self.device:
            return catalog.device(self.device)
        if len(self.platform) not in (2, 3) or not all(self.platform):
            raise UnsupportedTargetError(self.text, "a platform is written OS/ARCH or OS/ARCH/ACCELERATOR", [])
        return catalog.platform(*self.platform)


def parse_targets(value: str) -> list[TargetSpec]:
    """Targets from a tag value: separated by commas and/or spaces, duplicates dropped.

    SageMaker refuses commas in tag values, so in AWS write ``ml_c5 rasp4b LINUX/ARM64``."""
    seen: dict[str, TargetSpec] = {}
    for word in re.split(r"[,\s]+", value):
        if word.strip():
            spec = TargetSpec.parse(word.strip())
            seen.setdefault(spec.key, spec)
    return list(seen.values())


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


def job_name(package_arn: str, group: str, version: int | str, target: TargetSpec) -> str:
    """Deterministic compilation-job name for (package version, target), at most 63 characters:
    ``kiln-<group>-v<version>-<target>-<hash>`` (the group is shortened to fit)."""
    digest = hashlib.sha256(f"{package_arn.lower()}|{target.key}".encode()).hexdigest()[:8]
    tail = f"v{version}-{_slug(target.key)}-{digest}"
    budget = 63 - len("kiln-") - len(tail) - 1
    group_part = _slug(group)[:max(budget, 0)].strip("-")
    name = f"kiln-{group_part}-{tail}" if group_part else f"kiln-{tail}"
    if not _JOB_NAME.fullmatch(name):  # a very long version number: keep the hash, drop the rest
        name = f"kiln-{digest}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def specification_name(target_key: str) -> str:
    """The additional inference specification's Name for a target (``ml_c4`` -> ``ml-c4``)."""
    return re.sub(r"[^a-zA-Z0-9]+", "-", target_key).strip("-")[:63]


@functools.cache
def _instance_type_enums() -> tuple[frozenset[str], frozenset[str]]:
    """SageMaker's realtime and transform instance types (botocore's enums)."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    return (frozenset(model.shape_for("ProductionVariantInstanceType").enum),
            frozenset(model.shape_for("TransformInstanceType").enum))


class RegistryHook:
    """Compile on approval; write the compiled variants back to the model package."""

    def __init__(self, service: CompilationJobService, sagemaker: Any, config: RegistryConfig,
                 catalog: TargetCatalog | None = None, *, verify_attempts: int = 5,
                 retry_delay: float = 0.2) -> None:
        self._service = service
        self._sagemaker = sagemaker
        self._config = config
        self._catalog = catalog or service.catalog
        self._verify_attempts = verify_attempts
        self._retry_delay = retry_delay

    # -- compile on approval -----------------------------------------------------------------
    def on_model_package_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Create one job per target for an ``Approved`` package version; a summary for the caller."""
        detail = event.get("detail") or {}
        arn = detail.get("ModelPackageArn", "")
        status = detail.get("ModelApprovalStatus")
        group = detail.get("ModelPackageGroupName")
        version = detail.get("ModelPackageVersion")
        summary: dict[str, Any] = {"ModelPackageArn": arn, "created": [], "skipped": [], "unknown": [],
                                   "rejected": [], "failed": []}
        if status != "Approved":
            log.info("model package %s is %s, not Approved: nothing to compile", arn, status)
            return {**summary, "ignored": f"ModelApprovalStatus is {status}"}
        if not arn or not group or version is None:
            log.info("model package %s is not a versioned package in a group: nothing to compile", arn or "?")
            return {**summary, "ignored": "not a versioned model package"}
        targets_text, origin = self._targets_for(group)
        targets = parse_targets(targets_text)
        if not targets:
            log.info("model package group %s has no '%s' tag and no default targets are configured: "
                     "nothing to compile for %s", group, TARGETS_TAG, arn)
            return {**summary, "ignored": "no targets"}
        if not self._config.output_s3.startswith("s3://") or not self._config.role_arn:
            log.error("registry output location or role is not configured (KILN_REGISTRY_OUTPUT_S3, "
                      "KILN_REGISTRY_ROLE_ARN): cannot compile %s", arn)
            return {**summary, "ignored": "registry not configured"}
        log.info("compiling %s for %s (targets from %s)", arn, ", ".join(t.text for t in targets), origin)
        for target in targets:
            self._create_job(arn, group, version, target, summary)
        if summary["failed"]:
            raise RetryLater(f"{len(summary['failed'])} job(s) for {arn} could not be created: {summary['failed']}")
        return summary

    def _targets_for(self, group: str) -> tuple[str, str]:
        """The group's ``kiln:targets`` tag value, else the deployment default."""
        group_arn = self._sagemaker.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupArn"]
        kwargs: dict[str, Any] = {"ResourceArn": group_arn}
        while True:
            page = self._sagemaker.list_tags(**kwargs)
            for tag in page.get("Tags", []):
                if tag["Key"] == TARGETS_TAG and tag.get("Value", "").strip():
                    return tag["Value"], f"the '{TARGETS_TAG}' tag of {group}"
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
        return self._config.default_targets, "the deployment default (KILN_REGISTRY_DEFAULT_TARGETS)"

    def _create_job(self, arn: str, group: str, version: int | str, target: TargetSpec,
                    summary: dict[str, Any]) -> None:
        try:
            target.resolve(self._catalog)
        except UnsupportedTargetError as exc:
            log.warning("skipping target '%s' for %s: %s", target.text, arn, exc.reason)
            summary["unknown"].append({"target": target.text, "reason": exc.reason})
            return
        name = job_name(arn, group, version, target)
        request = {
            "CompilationJobName": name,
            "RoleArn": self._config.role_arn,
            "ModelPackageVersionArn": arn,
            "OutputConfig": {"S3OutputLocation": f"{self._config.output_s3.rstrip('/')}/{group}/{version}/",
                             **target.output_config()},
            "StoppingCondition": {"MaxRuntimeInSeconds": self._config.max_runtime_seconds},
            "Tags": [{"Key": PACKAGE_ARN_TAG, "Value": arn}, {"Key": SOURCE_TAG, "Value": SOURCE_REGISTRY},
                     {"Key": TARGET_TAG, "Value": target.text}],
        }
        try:
            self._service.create(request)
        except ResourceInUse:
            log.info("job %s for %s (%s) already exists: not created again", name, arn, target.text)
            summary["skipped"].append(name)
        except ValidationError as exc:
            log.warning("skipping target '%s' for %s: the job was refused: %s", target.text, arn, exc.message)
            summary["rejected"].append({"target": target.text, "reason": exc.message})
        except Exception as exc:  # limits, throttling: the event is retried, created jobs are skipped then
            log.warning("could not create job %s for %s: %s", name, arn, error_code(exc))
            summary["failed"].append({"target": target.text, "reason": error_code(exc)})
        else:
            log.info("created job %s for %s (%s)", name, arn, target.text)
            summary["created"].append(name)

    # -- write-back --------------------------------------------------------------------------
    def on_job_state_change(self, event: dict[str, Any]) -> dict[str, Any]:
        """Add a completed registry job's artifact to its model package (idempotent)."""
        job = event.get("detail") or {}
        name = job.get("CompilationJobName", "?")
        status = job.get("CompilationJobStatus")
        if status != "COMPLETED":
            if status == "FAILED" and job.get("ModelPackageVersionArn"):
                log.info("job %s failed; model package %s left unchanged: %s", name,
                         job["ModelPackageVersionArn"], job.get("FailureReason"))
            return {"job": name, "ignored": f"status is {status}"}
        try:
            tags = {t["Key"]: t["Value"] for t in
                    self._service.list_tags({"ResourceArn": job["CompilationJobArn"], "MaxResults": 50})["Tags"]}
        except ResourceNotFound:
            log.info("job %s no longer exists: nothing to write back", name)
            return {"job": name, "ignored": "job not found"}
        if tags.get(SOURCE_TAG) != SOURCE_REGISTRY:
            return {"job": name, "ignored": "not started by the registry hook"}
        package_arn = tags.get(PACKAGE_ARN_TAG) or job.get("ModelPackageVersionArn")
        if not package_arn:
            log.warning("registry job %s names no model package: nothing to write back", name)
            return {"job": name, "ignored": "no model package"}
        output = job.get("OutputConfig") or {}
        target_key = output.get("TargetDevice") or "_".join(
            v for v in ((output.get("TargetPlatform") or {}).get(k) for k in ("Os", "Arch", "Accelerator")) if v)
        spec_name = specification_name(target_key)
        try:
            package = self._sagemaker.describe_model_package(ModelPackageName=package_arn)
        except ClientError as exc:
            if is_retryable(exc):
                raise
            log.warning("model package %s of job %s cannot be described (%s): nothing written back",
                        package_arn, name, error_code(exc))
            return {"job": name, "ignored": f"model package unavailable ({error_code(exc)})"}
        result = {"job": name, "ModelPackageArn": package_arn, "Specification": spec_name}
        if self._has_spec(package, spec_name):
            log.info("model package %s already lists '%s': not added again (job %s)", package_arn, spec_name, name)
            self._tag_job(job["CompilationJobArn"], package_arn, spec_name)
            return {**result, "written": False}
        if len(package.get("AdditionalInferenceSpecifications") or []) >= MAX_ADDITIONAL_SPECIFICATIONS:
            log.error("model package %s already has %d additional inference specifications (the limit): "
                      "'%s' from job %s not added", package_arn, MAX_ADDITIONAL_SPECIFICATIONS, spec_name, name)
            return {**result, "written": False, "ignored": "specification limit reached"}
        spec = self.specification(job, package, target_key, spec_name)
        self._add_spec(package_arn, spec)
        self._tag_job(job["CompilationJobArn"], package_arn, spec_name)
        log.info("added '%s' (%s) to model package %s", spec_name,
                 job["ModelArtifacts"]["S3ModelArtifacts"], package_arn)
        return {**result, "written": True}

    def specification(self, job: dict[str, Any], package: dict[str, Any], target_key: str,
                      spec_name: str) -> dict[str, Any]:
        """The additional inference specification for one completed job."""
        source = ((package.get("InferenceSpecification") or {}).get("Containers") or [{}])[0]
        container: dict[str, Any] = {"ModelDataUrl": job["ModelArtifacts"]["S3ModelArtifacts"]}
        image = job.get("InferenceImage") or self._config.inference_image
        if image:
            container["Image"] = image
        for member in ("Framework", "FrameworkVersion", "ModelInput"):
            if source.get(member):
                container[member] = source[member]
        container["Environment"] = {
            "KILN_COMPILATION_JOB_ARN": job["CompilationJobArn"], "KILN_TARGET": target_key,
            "KILN_ARTIFACT_DIGEST": (job.get("ModelDigests") or {}).get("ArtifactDigest", "")}
        spec: dict[str, Any] = {
            "Name": spec_name,
            "Description": f"Compiled by Kiln for {target_key} (compilation job {job['CompilationJobName']})",
            "Containers": [container],
        }
        try:
            target = self._catalog.for_output_config(job.get("OutputConfig") or {})
        except (UnsupportedTargetError, KeyError):
            target = None
        if target is not None and target.is_cloud:
            realtime, transform = _instance_type_enums()
            if supported := [i for i in target.instance_types if i in realtime]:
                spec["SupportedRealtimeInferenceInstanceTypes"] = supported
            if supported := [i for i in target.instance_types if i in transform]:
                spec["SupportedTransformInstanceTypes"] = supported
        return spec

    @staticmethod
    def _has_spec(package: dict[str, Any], spec_name: str) -> bool:
        return any(s.get("Name") == spec_name for s in package.get("AdditionalInferenceSpecifications") or [])

    def _add_spec(self, package_arn: str, spec: dict[str, Any]) -> None:
        """Append ``spec`` and confirm it landed; retry while it is missing (a concurrent update lost it)."""
        for attempt in range(1, self._verify_attempts + 1):
            self._sagemaker.update_model_package(ModelPackageArn=package_arn,
                                                 AdditionalInferenceSpecificationsToAdd=[spec])
            package = self._sagemaker.describe_model_package(ModelPackageName=package_arn)
            if self._has_spec(package, spec["Name"]):
                return
            log.warning("'%s' missing from %s after update %d (a concurrent update won); retrying",
                        spec["Name"], package_arn, attempt)
            time.sleep(self._retry_delay * attempt)
        raise RetryLater(f"'{spec['Name']}' could not be added to {package_arn}")

    def _tag_job(self, job_arn: str, package_arn: str, spec_name: str) -> None:
        self._service.add_tags({"ResourceArn": job_arn, "Tags": [
            {"Key": PACKAGE_ARN_TAG, "Value": package_arn}, {"Key": SPECIFICATION_TAG, "Value": spec_name}]})

