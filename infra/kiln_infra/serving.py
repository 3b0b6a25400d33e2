"""The serving images a deployment names as InferenceImage: built from serving-container/ or prebuilt."""

from __future__ import annotations

from aws_cdk import IgnoreMode, Stack
from aws_cdk import aws_ecr_assets as ecr_assets
from constructs import Construct

from kiln_infra.config import KilnConfig
from kiln_infra.paths import REPO_ROOT, SERVING_CONTEXT_EXCLUDE, SERVING_DOCKERFILES

# The platform each family's image is built for (Graviton images are ARM64).
PLATFORMS = {"x86_64": ecr_assets.Platform.LINUX_AMD64, "aarch64": ecr_assets.Platform.LINUX_ARM64,
             "cuda": ecr_assets.Platform.LINUX_AMD64}
# The serving families each runner compiles for (jobs of a disabled runner cannot be created).
RUNNER_FAMILIES = {"cpu": ("x86_64", "aarch64"), "gpu": ("cuda",)}


class ServingImages(Construct):
    """One image per serving family: a Docker image asset ("asset") or the configured URI."""

    def __init__(self, scope: Construct, construct_id: str, *, config: KilnConfig) -> None:
        super().__init__(scope, construct_id)
        enabled = {family for runner in config.target_families for family in RUNNER_FAMILIES[runner]}
        self.uris: dict[str, str] = {}
        for family, value in config.serving_images.items():
            if family not in enabled or not value:
                continue
            if value == "asset":
                asset = ecr_assets.DockerImageAsset(
                    self, f"Image-{family}", directory=str(REPO_ROOT), file=SERVING_DOCKERFILES[family],
                    platform=PLATFORMS[family], exclude=SERVING_CONTEXT_EXCLUDE, ignore_mode=IgnoreMode.DOCKER)
                value = asset.image_uri
            self.uris[family] = value

    def environment_value(self) -> str:
        """``KILN_INFERENCE_IMAGES``: the family -> URI map as JSON (resolved by CloudFormation)."""
        return Stack.of(self).to_json_string(self.uris)
