"""Which serving image a completed job names as its ``InferenceImage``.

SageMaker's ``Model.compile()`` reads ``InferenceImage`` from DescribeCompilationJob for ``ml_*``
targets and deploys the compiled model with that image. Kiln's serving images
(``serving-container/``) come in one image per hardware family; a deployment configures the
image of each family (``KILN_INFERENCE_IMAGES``), and this module picks the one for a target.
Pure data and one function: no AWS SDK, no TVM.
"""

from __future__ import annotations

from collections.abc import Mapping

from kiln.catalog import Family, Target

# The serving image families, keyed by the catalog family of the targets each one runs.
SERVING_FAMILIES: dict[Family, str] = {Family.X86_64: "x86_64", Family.AARCH64: "aarch64", Family.CUDA: "cuda"}

# What local mode records: the tags `docker build` gives the serving Dockerfiles in docs/deploy.md.
# `kiln serve-model ARTIFACT` runs the same server without an image.
LOCAL_IMAGES: dict[str, str] = {"x86_64": "kiln-serving:local", "aarch64": "kiln-serving-arm64:local",
                                "cuda": "kiln-serving-gpu:local"}


def check_families(images: Mapping[str, str], member: str) -> None:
    """Raise ValueError unless every key of ``images`` is a serving family."""
    unknown = sorted(set(images) - set(SERVING_FAMILIES.values()))
    if unknown:
        raise ValueError(f"{member}: unknown serving famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                         f"use {sorted(SERVING_FAMILIES.values())}")


def inference_image(target: Target, images: Mapping[str, str], fallback: str = "") -> str:
    """The image recorded as a job's InferenceImage ('' for none).

    ``ml_*`` (SageMaker hosting) targets get their family's serving image; other targets, and
    families without a configured image, get ``fallback`` (the deployment-wide ``inference_image``)."""
    family = SERVING_FAMILIES.get(target.family)
    if target.is_cloud and family and images.get(family):
        return images[family]
    return fallback
