"""DescribeCompilationJob's InferenceImage per target family, through `kiln serve` (local mode, real compiles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.inference_images import LOCAL_IMAGES


def test_describe_names_the_serving_image_of_each_ml_target_family(
        sagemaker: Any, upload_model: Callable[[str, bytes], str], job_request: Callable[..., dict[str, Any]],
        unique: Callable[[str], str], wait_terminal: Callable[..., dict[str, Any]], tiny_onnx_archive: bytes) -> None:
    # GIVEN the tiny model compiled for an x86, a Graviton and an NVIDIA hosting target, and for Lambda (not hosted)
    names = {}
    for device in ("ml_c5", "ml_c6g", "ml_g4dn", "lambda"):
        name = names[device] = unique(f"image-{device.replace('_', '-')}")
        request = job_request(name)
        upload_model(f"{name}/model.tar.gz", tiny_onnx_archive)
        request["OutputConfig"]["TargetDevice"] = device
        sagemaker.create_compilation_job(**request)
    # WHEN the jobs complete and are described
    jobs = {device: wait_terminal(name, timeout=300) for device, name in names.items()}
    # THEN each ml_* job names its family's serving image (local mode: the local tags), as Model.compile() reads it
    for device, job in jobs.items():
        assert job["CompilationJobStatus"] == "COMPLETED", (device, job.get("FailureReason"))
    assert jobs["ml_c5"]["InferenceImage"] == LOCAL_IMAGES["x86_64"] == "kiln-serving:local"
    assert jobs["ml_c6g"]["InferenceImage"] == LOCAL_IMAGES["aarch64"]
    assert jobs["ml_g4dn"]["InferenceImage"] == LOCAL_IMAGES["cuda"]
    # AND a target SageMaker does not host gets none (no image is configured for every target)
    assert "InferenceImage" not in jobs["lambda"]
