"""The serving images: Docker image assets per family, named to the workflow as KILN_INFERENCE_IMAGES."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Stack
from kiln.inference_images import SERVING_FAMILIES
from kiln_infra import config as infra_config
from kiln_infra.config import KilnConfig
from kiln_infra.paths import REPO_ROOT, SERVING_DOCKERFILES
from kiln_infra.serving import ServingImages
from pydantic import ValidationError

from .conftest import Synthesized


def _docker_assets(synth: Synthesized) -> dict[str, dict[str, Any]]:
    manifest = json.loads(next(synth.template_path.parent.glob("*.assets.json")).read_text())
    return {image["source"]["dockerFile"]: image["source"] for image in manifest["dockerImages"].values()}


def test_each_serving_family_is_built_as_an_image_asset_for_its_platform(synth: Synthesized) -> None:
    # GIVEN the default deployment's asset manifest
    assets = _docker_assets(synth)
    # THEN every serving Dockerfile is an image asset, ARM64 for Graviton, and every serving family has one
    assert set(SERVING_DOCKERFILES) == set(SERVING_FAMILIES.values()) == set(infra_config.SERVING_FAMILIES)
    assert assets[SERVING_DOCKERFILES["x86_64"]]["platform"] == "linux/amd64"
    assert assets[SERVING_DOCKERFILES["aarch64"]]["platform"] == "linux/arm64"
    assert assets[SERVING_DOCKERFILES["cuda"]]["platform"] == "linux/amd64"
    # AND each build context holds only the pins, the runtime and the server
    context = synth.template_path.parent / assets[SERVING_DOCKERFILES["x86_64"]]["directory"]
    assert sorted(p.name for p in context.iterdir()) == ["functions", "requirements", "serving-container"]
    assert (context / "serving-container" / "kiln_serving" / "app.py").is_file()
    assert not list(context.rglob("__pycache__"))


def test_the_workflow_records_each_familys_image_uri(synth: Synthesized) -> None:
    # GIVEN the workflow steps function (RecordSuccess writes InferenceImage)
    (steps,) = [r for k, r in synth.of_type("AWS::Lambda::Function").items() if k.startswith("WorkflowFunctionsSteps")]
    value = steps["Properties"]["Environment"]["Variables"]["KILN_INFERENCE_IMAGES"]
    # WHEN its KILN_INFERENCE_IMAGES is rendered (the Fn::Join of a JSON object)
    text = "".join(part if isinstance(part, str) else part["Fn::Sub"] for part in value["Fn::Join"][1])
    images = json.loads(text)
    # THEN it maps every family to the ECR URI of that family's asset
    assert set(images) == {"x86_64", "aarch64", "cuda"}
    assets = {Path(p).name: s["directory"].removeprefix("asset.") for p, s in _docker_assets(synth).items()}
    for family, dockerfile in SERVING_DOCKERFILES.items():
        assert re.fullmatch(r"\$\{AWS::AccountId\}\.dkr\.ecr\.\$\{AWS::Region\}\.\$\{AWS::URLSuffix\}/"
                            r"cdk-[a-z0-9]+-container-assets-\$\{AWS::AccountId\}-\$\{AWS::Region\}:[0-9a-f]{64}",
                            images[family])
        assert images[family].endswith(":" + assets[Path(dockerfile).name])


def test_serving_dockerfiles_run_the_server_as_non_root_on_8080() -> None:
    # GIVEN each serving Dockerfile THEN it installs the pinned serving stack, runs python -m kiln_serving
    # as `serve` (how SageMaker starts it) as a non-root user, on port 8080
    for dockerfile in SERVING_DOCKERFILES.values():
        text = (REPO_ROOT / dockerfile).read_text()
        assert "-r /tmp/req/serving.txt" in text
        assert 'ENTRYPOINT ["python", "-m", "kiln_serving"]' in text and 'CMD ["serve"]' in text
        assert re.search(r"useradd .*--uid 10001", text) and "USER kiln" in text and "EXPOSE 8080" in text


def test_configured_uris_and_disabled_families() -> None:
    # GIVEN a CPU-only deployment with a prebuilt x86 image and no Graviton image
    stack = Stack(App(), "Serving")
    config = KilnConfig(target_families=("cpu",),
                        serving_images={"x86_64": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/serve:1",
                                        "aarch64": "", "cuda": "asset"})
    # WHEN the serving images are composed
    images = ServingImages(stack, "ServingImages", config=config)
    # THEN only the configured x86 URI is named (no GPU runner: no GPU image; "" names none)
    assert images.uris == {"x86_64": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/serve:1"}
    assert json.loads(stack.resolve(images.environment_value())) == images.uris


@pytest.mark.parametrize("bad", [{"arm64": "asset"}, {"x86_64": "my image"}])
def test_invalid_serving_images_are_refused(bad: dict[str, str]) -> None:
    # GIVEN an unknown family or a URI with a space WHEN configured THEN refused at synth
    with pytest.raises(ValidationError, match="serving_images"):
        KilnConfig(serving_images=bad)
