"""ONNX models through the loader, the TVM build and packaging, per target family."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import kiln.runtime
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln.catalog import TargetCatalog
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import (
    EF_ARM_ABI_FLOAT_HARD,
    EM_AARCH64,
    EM_ARM,
    EM_X86_64,
    compile_artifact,
    elf_header,
)

CATALOG = TargetCatalog()
NO_OPTS = CompilerOptions()
# TVM and onnxruntime sum in different orders: float32 rounding, nothing more.
RTOL, ATOL = 1e-4, 1e-6


def _compile(model_dir: Path, target: str, out: Path, options: str | None = None) -> Path:
    return compile_artifact(model_dir, "ONNX", target, out, options=options)


@pytest.fixture(scope="module")
def c4_artifact(squeezenet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SqueezeNet compiled for ml_c4 (AVX2: runs on this host)."""
    return Path(_compile(squeezenet_dir, "ml_c4", tmp_path_factory.mktemp("c4"), '{"class_labels": "labels.txt"}'))


def test_loader_infers_shapes_from_model(squeezenet_dir: Path) -> None:
    # GIVEN an ONNX model whose graph lists its weights as inputs too (IR v3)
    # WHEN it is loaded without DataInputConfig
    loaded = load_model("ONNX", squeezenet_dir, DataInputConfig(), NO_OPTS)
    # THEN the only real input and the output have the model's shapes
    assert [(s.name, s.shape, s.dtype) for s in loaded.inputs] == [("data_0", (1, 3, 224, 224), "float32")]
    assert [(s.name, s.shape) for s in loaded.outputs] == [("softmaxout_1", (1, 1000, 1, 1))]


def test_ml_c4_artifact_matches_onnxruntime(c4_artifact: Path, squeezenet: onnx.ModelProto) -> None:
    # GIVEN the ml_c4 artifact and random input
    model = kiln.runtime.load(c4_artifact)
    x = np.random.default_rng(7).random((1, 3, 224, 224), dtype=np.float32)
    # WHEN the artifact and onnxruntime run it
    (out,) = model.run({"data_0": x})
    (ref,) = ort.InferenceSession(squeezenet.SerializeToString()).run(None, {"data_0": x})
    # THEN the outputs agree within float32 rounding, and the manifest describes the model
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    assert out.argmax() == ref.argmax()
    assert model.inputs[0].shape == (1, 3, 224, 224) and model.outputs[0].shape == (1, 1000, 1, 1)
    assert model.class_labels is not None and model.class_labels[3] == "class3"
    m = model.manifest
    assert m["framework"] == "ONNX" and m["target"]["name"] == "ml_c4"
    assert {"avx2", "fma"} <= set(m["target"]["isa"]) and "avx512f" not in m["target"]["isa"]
    assert m["target"]["tvm_target"]["mcpu"] == "haswell"
    assert m["versions"]["apache-tvm"] == "0.27.0.post1"
    assert set(m["files"]) == {"model.so", "class_labels.txt"}


def test_artifact_is_reproducible_and_tamper_evident(c4_artifact: Path, tmp_path: Path) -> None:
    # GIVEN the artifact unpacked into a directory
    with tarfile.open(c4_artifact) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    # WHEN the library is modified after packaging
    kiln.runtime.read_manifest(tmp_path)
    with (tmp_path / "model.so").open("ab") as fh:
        fh.write(b"\0")
    # THEN the runtime refuses it; the tarball lists the manifest first
    assert names[0] == "manifest.json"
    with pytest.raises(kiln.runtime.ArtifactError, match="does not match its manifest digest"):
        kiln.runtime.load(tmp_path)


def test_runtime_refuses_wrong_input_shape(c4_artifact: Path) -> None:
    # GIVEN the loaded artifact
    model = kiln.runtime.load(c4_artifact)
    # WHEN an NHWC tensor or a wrong name is fed
    # THEN a ValueError names the input and the expected shape
    with pytest.raises(ValueError, match=r"'data_0' has shape \[1, 224, 224, 3\]"):
        model.run({"data_0": np.zeros((1, 224, 224, 3), np.float32)})
    with pytest.raises(ValueError, match="unknown input"):
        model.run({"data": np.zeros((1, 3, 224, 224), np.float32)})


def test_ml_c6g_is_aarch64_elf(squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN the model compiled for Graviton2
    art = Path(_compile(squeezenet_dir, "ml_c6g", tmp_path))
    # WHEN its library is inspected
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    manifest = kiln.runtime.read_manifest(tmp_path / "x")
    # THEN it is a 64-bit AArch64 shared object, and this x86 host refuses to load it
    assert elf_header(tmp_path / "x/model.so")[:2] == (2, EM_AARCH64)
    assert manifest["target"]["machine"] == "aarch64"
    with pytest.raises(kiln.runtime.IncompatibleHostError, match="needs a aarch64 machine"):
        kiln.runtime.load(art)


def test_rasp3b_is_armv7_hard_float(squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN the model compiled for a Raspberry Pi 3 (32-bit OS)
    art = Path(_compile(squeezenet_dir, "rasp3b", tmp_path))
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    # WHEN its ELF header is read
    cls, machine, flags = elf_header(tmp_path / "x/model.so")
    # THEN it is 32-bit ARM with the hard-float ABI flag
    assert (cls, machine) == (1, EM_ARM)
    assert flags & EF_ARM_ABI_FLOAT_HARD


def test_ml_g4dn_embeds_cuda_kernels(squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN the model compiled for a T4 (no GPU on this host)
    art = Path(_compile(squeezenet_dir, "ml_g4dn", tmp_path))
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    lib = (tmp_path / "x/model.so").read_bytes()
    manifest = kiln.runtime.read_manifest(tmp_path / "x")
    # WHEN the library is inspected
    # THEN it is an x86-64 host library carrying CUDA kernels, and the manifest records sm_75
    assert elf_header(tmp_path / "x/model.so")[:2] == (2, EM_X86_64)
    assert lib.count(b'extern "C" __global__') > 10
    assert manifest["target"]["cuda_arch"] == "sm_75"
    assert "avx512f" in manifest["target"]["isa"]  # g4dn hosts are Cascade Lake


def test_gpu_code_option_sets_cuda_arch(squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN a TargetPlatform NVIDIA build, which needs gpu-code
    # WHEN compiled without and with it
    with pytest.raises(ClientError, match="gpu-code"):
        _compile(squeezenet_dir, "LINUX:X86_64:NVIDIA", tmp_path / "a")
    art = Path(_compile(squeezenet_dir, "LINUX:X86_64:NVIDIA", tmp_path / "b",
                        "{'gpu-code': 'sm_86', 'trt-ver': '8.6', 'cuda-ver': '12.2'}"))
    with tarfile.open(art) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    # THEN the artifact records the requested architecture
    assert manifest["target"]["tvm_target"] == {"kind": "cuda", "arch": "sm_86"}


def test_x86_win64_is_pe_dll(squeezenet_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the Windows tvm-ffi DLL where `make install` puts it (as the image does), no override
    monkeypatch.delenv("KILN_WINDOWS_FFI_DIR", raising=False)
    # WHEN the model is compiled for x86_win64
    art = Path(_compile(squeezenet_dir, "x86_win64", tmp_path))
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    dll = (tmp_path / "x/model.dll").read_bytes()
    # THEN the library is a PE32+ x86-64 DLL importing tvm_ffi.dll
    pe = int.from_bytes(dll[0x3C:0x40], "little")
    assert dll[:2] == b"MZ" and dll[pe:pe + 4] == b"PE\0\0"
    assert int.from_bytes(dll[pe + 4:pe + 6], "little") == 0x8664  # IMAGE_FILE_MACHINE_AMD64
    assert b"tvm_ffi.dll" in dll


def test_unsupported_operator_is_a_client_error(tmp_path: Path) -> None:
    # GIVEN an ONNX model using an operator the frontend lacks
    node = onnx.helper.make_node("Celu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]),
              str(tmp_path / "m.onnx"))
    # WHEN it is loaded
    # THEN ClientError names the operator
    with pytest.raises(ClientError, match=r"operator\(s\) \['Celu'\]"):
        load_model("ONNX", tmp_path, DataInputConfig(), NO_OPTS)


def test_missing_and_ambiguous_model_files(tmp_path: Path, squeezenet: onnx.ModelProto) -> None:
    # GIVEN an archive dir without a model, then with two models, then with a corrupt one
    (tmp_path / "a").mkdir()
    (tmp_path / "a/readme.txt").write_text("hi")
    (tmp_path / "b").mkdir()
    onnx.save(squeezenet, str(tmp_path / "b/one.onnx"))
    onnx.save(squeezenet, str(tmp_path / "b/two.onnx"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c/model.onnx").write_bytes(b"\x08garbage")
    # WHEN each is loaded
    # THEN each gives a ClientError saying what to fix
    with pytest.raises(ClientError, match=r"no ONNX model file found .*readme.txt"):
        load_model("ONNX", tmp_path / "a", DataInputConfig(), NO_OPTS)
    with pytest.raises(ClientError, match=r"several \.onnx files"):
        load_model("ONNX", tmp_path / "b", DataInputConfig(), NO_OPTS)
    with pytest.raises(ClientError, match="not a valid ONNX model"):
        load_model("ONNX", tmp_path / "c", DataInputConfig(), NO_OPTS)


def test_data_input_config_mismatch_names_input(squeezenet_dir: Path) -> None:
    # GIVEN an NHWC DataInputConfig for an NCHW ONNX model
    cfg = DataInputConfig.parse('{"data_0": [1, 224, 224, 3]}', "ONNX")
    # WHEN loaded
    # THEN the error names data_0
    with pytest.raises(ClientError, match="input 'data_0' does not match"):
        load_model("ONNX", squeezenet_dir, cfg, NO_OPTS)


def test_dynamic_batch_takes_shape_from_data_input_config(tmp_path: Path) -> None:
    # GIVEN a small MatMul model with a symbolic batch dimension
    w = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])], [w])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    # WHEN loaded without and with DataInputConfig
    with pytest.raises(ClientError, match="input 'x' has a dynamic shape"):
        load_model("ONNX", tmp_path, DataInputConfig(), NO_OPTS)
    loaded = load_model("ONNX", tmp_path, DataInputConfig.parse('{"x": [5, 4]}', "ONNX"), NO_OPTS)
    # THEN the declared batch is used for the input and propagates to the output
    assert loaded.inputs[0].shape == (5, 4)
    assert loaded.outputs[0].shape == (5, 3)


def _small_conv_model() -> onnx.ModelProto:
    """One 3x3 convolution (16 -> 32 channels at 8x8) + ReLU: enough work for the default schedule's vectors."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).standard_normal((32, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mcpu_option_sets_the_manifest_isa(tmp_path: Path) -> None:
    # GIVEN an ml_c4 (AVX2) job whose CompilerOptions ask for mcpu znver4 (an AVX-512 CPU)
    (tmp_path / "m").mkdir()
    onnx.save(_small_conv_model(), str(tmp_path / "m" / "model.onnx"))
    # WHEN it is compiled and packaged
    art = compile_artifact(tmp_path / "m", "ONNX", "ml_c4", tmp_path, options='{"mcpu": "znver4"}')
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    manifest = kiln.runtime.read_manifest(tmp_path / "x")
    # THEN the code uses AVX-512 registers, and the manifest says so (the catalog's AVX2 list would not)
    disassembly = subprocess.run(["objdump", "-d", str(tmp_path / "x" / "model.so")], capture_output=True,
                                 text=True, check=True).stdout
    assert "%zmm" in disassembly
    assert {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"} <= set(manifest["target"]["isa"])
    assert manifest["target"]["tvm_target"]["mcpu"] == "znver4"
    # AND kiln.runtime refuses it on an AVX2-only host, naming what is missing
    avx2_host = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "ssse3", "sse4_1", "sse4_2", "popcnt"}
    with pytest.raises(kiln.runtime.IncompatibleHostError, match="avx512f"):
        kiln.runtime.check_host(manifest, machine="x86_64", flags=avx2_host)
    kiln.runtime.check_host(manifest, machine="x86_64", flags=avx2_host | set(manifest["target"]["isa"]))


def test_unknown_mcpu_is_a_client_error(tmp_path: Path) -> None:
    # GIVEN CompilerOptions naming a CPU the ISA table does not know, or one of another architecture
    # WHEN parsed for the target  THEN a ClientError names the option (the API refuses the same at create)
    tgt = CATALOG.device("ml_c4")
    with pytest.raises(ClientError, match="mcpu 'ivybridge' is not a x86_64 CPU Kiln knows"):
        CompilerOptions.parse('{"mcpu": "ivybridge"}', tgt)
    with pytest.raises(ClientError, match="'neoverse-n1' is not a x86_64 CPU"):
        CompilerOptions.parse('{"mcpu": "neoverse-n1"}', tgt)
    assert CompilerOptions.parse('{"mcpu": "neoverse-n1"}', CATALOG.device("ml_c6g")).mcpu == "neoverse-n1"
