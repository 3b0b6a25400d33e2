"""Run inside ``.venv-sagemaker``: the SageMaker SDK's compile flows against ``kiln serve``.

Usage: ``python sagemaker_sdk_flow.py REQUEST_JSON``; the endpoints come from botocore's
``AWS_ENDPOINT_URL_SAGEMAKER``/``AWS_ENDPOINT_URL_S3``, exactly as a user would point the stock SDK at
Kiln. Prints one JSON document: what ``Model.compile()`` set and what sagemaker-core's
``CompilationJob`` resource returned.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def model_compile(request: dict[str, Any]) -> dict[str, Any]:
    """SageMaker Python SDK v2: ``Model(model_data).compile(...)``, as in the Neo documentation."""
    import boto3
    import sagemaker
    from sagemaker.model import Model

    session = sagemaker.Session(boto_session=boto3.Session(region_name=request["region"]),
                                default_bucket=request["bucket"])
    model = Model(image_uri=None, model_data=request["model_data"], role=request["role"], sagemaker_session=session)
    compiled = model.compile(target_instance_family=request["target"], input_shape=request["input_shape"],
                             output_path=request["output_path"], role=request["role"], framework="onnx",
                             job_name=request["sdk_job"], compile_max_run=600)
    return {"model_data": compiled.model_data, "image_uri": compiled.image_uri,
            "is_compiled": compiled._is_compiled_model, "job_name": compiled._compilation_job_name}


def core_compilation_job(request: dict[str, Any]) -> dict[str, Any]:
    """sagemaker-core: ``CompilationJob.create`` -> ``wait`` -> ``get`` (its shapes validate every response)."""
    import boto3
    from sagemaker_core.resources import CompilationJob
    from sagemaker_core.shapes import InputConfig, OutputConfig, StoppingCondition

    boto_session = boto3.Session(region_name=request["region"])
    job = CompilationJob.create(
        compilation_job_name=request["core_job"], role_arn=request["role"],
        input_config=InputConfig(s3_uri=request["model_data"], framework="ONNX",
                                 data_input_config=json.dumps(request["input_shape"])),
        output_config=OutputConfig(s3_output_location=request["output_path"] + "/core",
                                   target_device=request["target"]),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=600),
        session=boto_session, region=request["region"])
    job.wait(poll=1, timeout=300)
    got = CompilationJob.get(compilation_job_name=request["core_job"], session=boto_session,
                             region=request["region"])
    return {"status": got.compilation_job_status, "arn": got.compilation_job_arn,
            "artifact": got.model_artifacts.s3_model_artifacts, "inference_image": got.inference_image,
            "digest": got.model_digests.artifact_digest, "target": got.output_config.target_device}


def main() -> None:
    request = json.loads(sys.argv[1])
    print(json.dumps({"sdk": model_compile(request), "core": core_compilation_job(request)}))


if __name__ == "__main__":
    main()
