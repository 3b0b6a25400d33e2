"""x86_win64 ONNX jobs in local mode on a fresh clone: the compiler process finds tvm_ffi.dll where
`make install` put it (scripts/kiln_assets.py, as the compiler image does), with no override."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest


def test_x86_win64_onnx_job_completes_in_local_mode(local_stack: Any, service: Any, job_request: Any,
                                                    upload_model: Any, tiny_onnx_archive: bytes, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN no KILN_WINDOWS_FFI_DIR in the environment the local compiler process inherits
    monkeypatch.delenv("KILN_WINDOWS_FFI_DIR", raising=False)
    # AND an ONNX model in S3, and a job for Windows x86-64
    name = "win64-local"
    upload_model(f"{name}/model.tar.gz", tiny_onnx_archive)
    request = job_request(name)
    request["OutputConfig"]["TargetDevice"] = "x86_win64"
    # WHEN the job runs through the workflow and the local compiler process
    service.create(request)
    job = local_stack.wait_for(name, timeout=600)
    # THEN it completes with a PE32+ x86-64 DLL importing tvm_ffi.dll, and a manifest for Windows
    assert job["CompilationJobStatus"] == "COMPLETED", job.get("FailureReason")
    bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"][len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    with tarfile.open(local) as tar:
        dll = tar.extractfile("model.dll").read()  # type: ignore[union-attr]
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    pe = int.from_bytes(dll[0x3C:0x40], "little")
    assert dll[:2] == b"MZ" and dll[pe:pe + 4] == b"PE\0\0"
    assert int.from_bytes(dll[pe + 4:pe + 6], "little") == 0x8664  # IMAGE_FILE_MACHINE_AMD64
    assert b"tvm_ffi.dll" in dll
    assert manifest["target"]["family"] == "windows" and manifest["library"] == "model.dll"
