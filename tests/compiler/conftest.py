"""Shared fixtures for the compiler tests: real models, archives, a moto S3 server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import boto3
import onnx
import pytest
from kiln.catalog import Target, TargetCatalog
from kiln_compiler import CompilerOptions, compile_model
from kiln_compiler.package import package
from kiln_compiler.samples import load_light_model

os.environ.setdefault("TVM_NUM_THREADS", "2")

LIGHT_DIR = Path(onnx.__file__).parent / "backend/test/data/light"


def randomized_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """One of onnx's light models with random weights (see ``kiln_compiler.samples``)."""
    return load_light_model(name, seed)


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    """A .tar.gz holding ``files`` (name -> content)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def squeezenet() -> onnx.ModelProto:
    """SqueezeNet 1.0 (opset 9) with random weights; input data_0 [1,3,224,224]."""
    return randomized_light_model("squeezenet")


@pytest.fixture(scope="session")
def squeezenet_dir(tmp_path_factory: pytest.TempPathFactory, squeezenet: onnx.ModelProto) -> Path:
    """An unpacked archive directory holding model.onnx."""
    d = tmp_path_factory.mktemp("squeezenet")
    onnx.save(squeezenet, str(d / "model.onnx"))
    (d / "labels.txt").write_text("\n".join(f"class{i}" for i in range(1000)))
    return d


def elf_header(path: Path) -> tuple[int, int, int]:
    """(EI_CLASS, e_machine, e_flags) of an ELF file."""
    data = path.read_bytes()[:64]
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    machine = int.from_bytes(data[18:20], order)
    flags = int.from_bytes(data[48:52] if data[4] == 2 else data[36:40], order)
    return data[4], machine, flags


EM_X86_64, EM_AARCH64, EM_ARM = 62, 183, 40
EF_ARM_ABI_FLOAT_HARD = 0x400


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server on a free loopback port; yields its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def target_named(name: str) -> Target:
    """A catalog target by TargetDevice (``ml_c4``) or platform (``LINUX:X86_64:NVIDIA``)."""
    catalog = TargetCatalog()
    return catalog.platform(*name.split(":")) if ":" in name else catalog.device(name)


def compile_artifact(model_dir: Path, framework: str, target: str, out: Path, *, options: str | None = None,
                     data_input_config: str | None = None) -> Path:
    """``compile_model`` then ``package``, as a job does; returns the artifact (.tar.gz).

    ``options`` is the CompilerOptions string, parsed with the target's rules as the job parses it."""
    tgt = target_named(target)
    opts = CompilerOptions.parse(options, tgt)
    result = compile_model(model_dir, framework, tgt, opts, out_dir=out / "build", data_input_config=data_input_config)
    return package(result, tgt, out / f"model-{tgt.name}.tar.gz", model_dir=model_dir,
                   labels_name=opts.class_labels).path


ROLE = "arn:aws:iam::123456789012:role/KilnUserModelAccess"


@pytest.fixture()
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS settings pointing at the moto server (also set in this process)."""
    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "TVM_NUM_THREADS": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


def entrypoint_job(name: str, s3_uri: str, **output: Any) -> dict[str, Any]:
    """The KILN_JOB of an ONNX job (SqueezeNet's input) for ``python -m kiln_compiler``."""
    return {
        "CompilationJobName": name,
        "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}",
        "RoleArn": ROLE,
        "InputConfig": {"S3Uri": s3_uri, "Framework": "ONNX", "DataInputConfig": '{"data_0": [1, 3, 224, 224]}'},
        "OutputConfig": {"S3OutputLocation": "s3://user-out/compiled", "TargetDevice": "ml_c4", **output},
        "StoppingCondition": {"MaxRuntimeInSeconds": 900},
    }


def run_entrypoint(job: dict[str, Any], env: dict[str, str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run the container entrypoint as a process, the job in its environment and ``tmp_path`` as work dir."""
    return subprocess.run([sys.executable, "-m", "kiln_compiler"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "KILN_JOB": json.dumps(job), "KILN_WORK_DIR": str(tmp_path),
                               **extra}, check=False)


@pytest.fixture()
def buckets(aws_env: dict[str, str]) -> Any:
    """The user's model and output buckets on the moto server; an S3 client."""
    s3 = boto3.client("s3")
    for b in ("user-models", "user-out"):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=b)
    return s3
