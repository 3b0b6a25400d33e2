"""bf16 convolutions (ADR 0052): unpadded inputs (ResNet's 1x1 layers) read without a copy, the epilogue's bf16
rounding as `vcvtneps2bf16`.

Tolerance as in test_bf16.py: each bf16 layer may add ~2^-8 of its output's scale. The residual block has
three bf16 layers on its longest path (1x1, 3x3, 1x1; the projection shortcut is one more 1x1), asserted at
4 x 3 x 2^-8 (5%) of the largest output; a wrong kernel is off by the order of the output itself.
"""

from __future__ import annotations

from pathlib import Path

import kiln.runtime
import numpy as np
import onnxruntime as ort
import pytest
import tvm
from kiln_compiler import pipeline
from kiln_compiler.schedules import target_vector_unit
from kiln_compiler.schedules.bf16 import schedule_bf16_conv
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import disassemble, residual_bn_block

BF16_LAYER_ERROR = 2.0**-8
ZEN4 = {"kind": "llvm", "mcpu": "znver4"}


def _relax_block() -> tvm.IRModule:
    return from_onnx(residual_bn_block(), shape_dict={"input": [1, 16, 16, 16]}, keep_params_in_input=False)


def test_unpadded_bf16_convolutions_read_their_input_without_a_copy() -> None:
    # GIVEN the residual block's bf16 convolution kernels (three 1x1, one padded 3x3)
    tgt = pipeline.make_target(ZEN4)
    with tgt:
        fused = pipeline._cpu_kernels(_relax_block(), tgt, True, "bf16")
        kernels = {gv.name_hint: f for gv, f in fused.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint}
        # WHEN each gets the vdpbf16ps schedule
        scheduled = {name: schedule_bf16_conv(f, target_vector_unit(tgt)) for name, f in kernels.items()}
    assert len(scheduled) == 4 and all(s is not None for s in scheduled.values())
    copies = {name: 'sblock("pad_temp")' in s.script() for name, s in scheduled.items() if s is not None}
    # THEN the 1x1 kernels have no copy of their input left (TVM's legalisation writes one for every conv);
    # the 3x3 keeps its zero-padded copy (vdpbf16ps broadcasts from it, no bounds check in the loop)
    assert sorted(copies.values()) == [False, False, False, True]
    assert all("pad_temp" in kernels[name].script() for name in copies)


def test_bf16_residual_block_runs_vdpbf16ps_and_agrees_with_onnx_runtime(tmp_path: Path) -> None:
    # GIVEN the residual block compiled in bf16 for Zen 4
    compiled = pipeline.compile_relax(_relax_block(), ZEN4, precision="bf16")
    assert compiled.unscheduled == []
    lib = tmp_path / "block.so"
    compiled.executable.export_library(str(lib))
    # THEN its convolutions multiply with vdpbf16ps
    assert "vdpbf16ps" in disassemble(lib)
    if "avx512_bf16" not in (kiln.runtime.cpu_flags() or set()):
        pytest.skip("the host has no AVX512-BF16 to run the bf16 code")
    # WHEN it and ONNX Runtime (fp32) run the same input
    x = np.random.default_rng(5).standard_normal((1, 16, 16, 16)).astype("float32")
    vm = tvm.relax.VirtualMachine(compiled.executable, tvm.cpu())
    out = np.asarray(vm["main"](tvm.runtime.tensor(x)).numpy())
    (ref,) = ort.InferenceSession(residual_bn_block().SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"input": x})
    # THEN within three bf16 layers' error of the output's scale, and not bit-identical (bf16 operands)
    error = float(np.abs(out - ref).max())
    assert 0 < error <= 4 * 3 * BF16_LAYER_ERROR * float(np.abs(ref).max())


def _scaled_identity_pair() -> tvm.IRModule:
    """Two 1x1 convolutions, 16 -> 16 channels on [1, 16, 8, 8]: weights 1.5 x identity, relu, then identity.
    In bf16 the output is exactly bf16(relu(1.5 x bf16(x))): every product and sum is exact in fp32 (one
    nonzero term, 1.5 has two significand bits), so the only roundings are the input cast and the first
    convolution's epilogue writing bf16 for the second."""
    from onnx import TensorProto, helper, numpy_helper

    eye = np.eye(16, dtype="float32").reshape(16, 16, 1, 1)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["output"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "scaled_identity_pair",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [numpy_helper.from_array(1.5 * eye, "w1"), numpy_helper.from_array(eye, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return from_onnx(model, shape_dict={"input": [1, 16, 8, 8]}, keep_params_in_input=False)


def _round_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 -> fp32, round to nearest even (finite inputs)."""
    bits = x.astype("float32").view("uint32").astype("uint64")
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype("uint32").view("float32")


def test_bf16_epilogue_rounds_to_nearest_even_with_vcvtneps2bf16(tmp_path: Path) -> None:
    # GIVEN two 1x1 convolutions whose bf16 result is exactly the two roundings (see the helper)
    compiled = pipeline.compile_relax(_scaled_identity_pair(), ZEN4, precision="bf16")
    assert compiled.unscheduled == []
    lib = tmp_path / "pair.so"
    compiled.executable.export_library(str(lib))
    # THEN the first convolution's epilogue rounds with vcvtneps2bf16, not the legaliser's integer sequence
    asm = disassemble(lib)
    assert "vcvtneps2bf16" in asm and "vdpbf16ps" in asm
    if "avx512_bf16" not in (kiln.runtime.cpu_flags() or set()):
        pytest.skip("the host has no AVX512-BF16 to run the bf16 code")
    # WHEN it runs on normal inputs (ties among them: 1.5 x an 8-bit significand needs up to 10 bits)
    x = np.random.default_rng(7).standard_normal((1, 16, 8, 8)).astype("float32")
    vm = tvm.relax.VirtualMachine(compiled.executable, tvm.cpu())
    out = np.asarray(vm["main"](tvm.runtime.tensor(x)).numpy())
    # THEN every value is bit-identical to round-to-nearest-even of 1.5 x bf16(x), after relu
    expected = _round_to_bf16(np.maximum(1.5 * _round_to_bf16(x), 0))
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, np.maximum(1.5 * _round_to_bf16(x), 0))  # the rounding did happen
