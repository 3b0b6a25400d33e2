"""A bf16 job's deviation from fp32 on the job record: ``Kiln.Precision`` of DescribeCompilationJob (ADR 0022)."""

from __future__ import annotations

import io
from typing import Any

from kiln import runtime


def test_bf16_job_records_its_deviation_from_fp32(local_stack: Any, service: Any, job_request: Any,
                                                  upload_model: Any, tiny_onnx_archive: bytes) -> None:
    # GIVEN a real ONNX model (MatMul -> Add -> Relu) and a bf16 job for a Zen 4 CPU (ml_c5 with mcpu znver4)
    upload_model("prec-bf16/model.tar.gz", tiny_onnx_archive)
    request = job_request("prec-bf16")
    request["OutputConfig"].update(TargetDevice="ml_c5", CompilerOptions='{"precision": "bf16", "mcpu": "znver4"}')
    # WHEN it runs in local mode
    service.create(request)
    job = local_stack.wait_for("prec-bf16", timeout=300)
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN the record says how far the bf16 build is from the fp32 build, or why that was not measured here
    precision = job["Kiln"]["Precision"]
    assert precision["dtype"] == "bf16"
    if "avx512_bf16" in (runtime.cpu_flags() or set()):
        assert precision["measured"] is True and precision["samples"] == 4
        # 8 inputs into 4 outputs: one bf16 rounding of each operand, well within 2^-7 of the outputs' scale
        assert 0 <= precision["max_abs_error"] <= 2.0**-7 * max(precision["max_abs_reference"], 1.0)
        assert 0.0 <= precision["top1_agreement"] <= 1.0
    else:
        assert precision["measured"] is False and "cannot run code for mcpu 'znver4'" in precision["reason"]


def test_calibrated_int8_job_records_its_deviation_from_fp32(local_stack: Any, service: Any, job_request: Any,
                                                            upload_model: Any) -> None:
    # GIVEN a real ONNX model (MatMul -> Add -> Relu) and 16 representative inputs in the archive's calib/x.npz,
    # and a job asking to quantize it to int8 by calibration (ml_c4)
    import numpy as np

    from tests.conftest import tar_gz, tiny_onnx_model

    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(4).standard_normal((16, 8)).astype("float32"))
    upload_model("prec-int8/model.tar.gz", tar_gz({"model.onnx": tiny_onnx_model().SerializeToString(),
                                                   "calib/x.npz": buffer.getvalue()}))
    request = job_request("prec-int8")
    request["OutputConfig"]["CompilerOptions"] = '{"quantize": {"dtype": "int8", "calibration": "calib/x.npz"}}'
    # WHEN it runs in local mode
    service.create(request)
    job = local_stack.wait_for("prec-int8", timeout=300)
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN Kiln.Precision holds the int8 build's deviation from the fp32 model on the calibration inputs
    # (4 outputs of 8 inputs: a few activation steps of 1/255 of their range, far below the outputs' scale)
    precision = job["Kiln"]["Precision"]
    assert precision["dtype"] == "int8" and precision["measured"] is True, precision
    assert precision["samples"] == 16 and precision["calibration_samples"] == 16
    assert 0 < precision["max_abs_error"] <= 0.05 * precision["max_abs_reference"], precision
    # AND Kiln.Accuracy its agreement with ONNX Runtime running the QDQ model Kiln made
    accuracy = job["Kiln"]["Accuracy"]
    assert accuracy["measured"] is True and accuracy["reference"].endswith("same QDQ model"), accuracy
