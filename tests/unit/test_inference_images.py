"""Which serving image a job names as InferenceImage, per target family (kiln.inference_images)."""

from __future__ import annotations

import pytest
from kiln.catalog import TargetCatalog
from kiln.config import KilnSettings
from kiln.inference_images import SERVING_FAMILIES, inference_image
from pydantic import ValidationError

IMAGES = {"x86_64": "acct.dkr.ecr/kiln-serving:cpu", "aarch64": "acct.dkr.ecr/kiln-serving:arm64",
          "cuda": "acct.dkr.ecr/kiln-serving:gpu"}
CATALOG = TargetCatalog()


@pytest.mark.parametrize(("device", "family"), [
    ("ml_c4", "x86_64"), ("ml_c5", "x86_64"), ("ml_m5", "x86_64"), ("ml_c6g", "aarch64"), ("ml_m6g", "aarch64"),
    ("ml_p3", "cuda"), ("ml_g4dn", "cuda"),
])
def test_ml_targets_get_their_familys_image(device: str, family: str) -> None:
    # GIVEN an ml_* target WHEN its InferenceImage is chosen THEN it is its family's serving image
    assert inference_image(CATALOG.device(device), IMAGES, "fallback") == IMAGES[family]


@pytest.mark.parametrize("device", ["jetson_nano", "rasp4b", "deeplens", "lambda", "x86_win64", "coreml"])
def test_edge_targets_get_the_fallback(device: str) -> None:
    # GIVEN a target SageMaker does not host WHEN its InferenceImage is chosen THEN only the deployment-wide one
    assert inference_image(CATALOG.device(device), IMAGES, "fallback") == "fallback"
    assert inference_image(CATALOG.device(device), IMAGES) == ""


def test_a_family_without_an_image_falls_back() -> None:
    # GIVEN only the x86 image configured WHEN a Graviton job completes THEN the fallback (or none)
    assert inference_image(CATALOG.device("ml_c6g"), {"x86_64": "x"}, "") == ""
    assert inference_image(CATALOG.device("ml_c6g"), {"x86_64": "x"}, "any") == "any"


def test_every_hosting_target_has_a_serving_family() -> None:
    # GIVEN the catalog WHEN each ml_* (hosting) device is looked at THEN a serving image family covers it
    hosted = [CATALOG.device(n) for n in CATALOG.supported_devices if CATALOG.device(n).is_cloud]
    assert hosted and all(t.family in SERVING_FAMILIES for t in hosted)


def test_settings_parse_the_images_and_refuse_unknown_families(monkeypatch: pytest.MonkeyPatch,
                                                               deployment_env: dict[str, str]) -> None:
    # GIVEN a deployment's settings with KILN_INFERENCE_IMAGES as JSON WHEN read THEN a mapping per family
    monkeypatch.setenv("KILN_INFERENCE_IMAGES", '{"x86_64": "a", "cuda": "c"}')
    assert KilnSettings().inference_images == {"x86_64": "a", "cuda": "c"}
    # AND a family that is no serving family is refused, naming the variable and the families
    monkeypatch.setenv("KILN_INFERENCE_IMAGES", '{"arm64": "b"}')
    with pytest.raises(ValidationError, match=r"KILN_INFERENCE_IMAGES: unknown serving family \['arm64'\]"):
        KilnSettings()
