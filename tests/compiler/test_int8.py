"""QDQ ONNX models (onnxruntime's ``quantize_static``) compiled to integer convolutions.

Tolerance: the integer convolutions accumulate exactly (u8 x s8 -> s32); the only rounding is the
requantization ``round_half_even(float(acc) * s_x * s_w / s_y)``, where Kiln's float32 product can
land on the other side of a .5 tie than ONNX Runtime's, i.e. 1 quantized unit. Such a 1-unit step
in an inner layer may move an outer layer by 1 unit too, so outputs are compared in units of the
output's quantization scale: at most 1 unit apart, and almost all of them identical.
"""

from __future__ import annotations

from pathlib import Path

import kiln.runtime
import numpy as np
import onnx
import pytest
from kiln_compiler.accuracy import reference_session
from kiln_compiler.graph import QuantizedConvToInteger
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import compile_and_disassemble, compile_artifact

# share of outputs that must equal ONNX Runtime's exactly (measured: 100% small CNN, >99% SqueezeNet)
MIN_EXACT = 0.95


def _output_scale(model: onnx.ModelProto) -> float:
    """Scale of the DequantizeLinear that produces the graph's (first) output."""
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear", f"output produced by {node.op_type}"
    return float(init[node.input[1]])


def _agreement(model_dir: Path, tmp_path: Path, input_name: str, shape: tuple[int, ...]) -> tuple[int, float]:
    """(max abs difference in output quantization units, share of identical outputs) of the ml_c4
    artifact vs ONNX Runtime running the same QDQ model on one random input."""
    qdq = onnx.load(str(model_dir / "model.onnx"))
    model = kiln.runtime.load(compile_artifact(model_dir, "ONNX", "ml_c4", tmp_path))
    x = np.random.default_rng(3).standard_normal(shape).astype("float32")
    (out,) = model.run({input_name: x})
    (ref,) = reference_session(qdq.SerializeToString()).run(
        None, {input_name: x})
    units = np.rint(np.abs(out.astype("float64") - ref) / _output_scale(qdq))
    return int(units.max()), float(np.mean(units == 0))


def test_every_qdq_convolution_becomes_integer(qdq_small_cnn_dir: Path) -> None:
    # GIVEN the QDQ small CNN in Relax (three DQ -> conv -> bias -> Q chains, relu folded into Q)
    mod = from_onnx(onnx.load(str(qdq_small_cnn_dir / "model.onnx")), shape_dict={"input": [1, 3, 32, 32]},
                    keep_params_in_input=False)
    # WHEN the rewrite runs
    rewrite = QuantizedConvToInteger()
    out = rewrite(mod)
    # THEN all three are u8 x s8 -> s32 convolutions and no fp32 convolution is left
    assert rewrite.rewritten == 3
    convs = [c for c in _calls(out) if c.op.name == "relax.nn.conv2d"]
    assert [(str(c.args[0].ty.dtype), str(c.args[1].ty.dtype), str(c.attrs.out_dtype)) for c in convs] == \
        [("uint8", "int8", "int32")] * 3
    # the input's zero point is not 0: the first layer pads with it instead of with 0
    pads = [c for c in _calls(out) if c.op.name == "relax.nn.pad"]
    assert len(pads) == 1 and float(pads[0].attrs.pad_value) != 0.0


def _calls(mod: object) -> list:
    from tvm import relax

    found: list = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and hasattr(e.op, "name") else None)
    return found


def test_qdq_small_cnn_matches_onnxruntime(qdq_small_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN a QDQ CNN made by quantize_static (per-channel s8 weights, u8 activations, asymmetric input)
    # WHEN compile_model builds it for ml_c4 and the artifact and ONNX Runtime run the same input
    worst, exact = _agreement(qdq_small_cnn_dir, tmp_path, "input", (1, 3, 32, 32))
    # THEN the outputs are at most 1 quantized unit apart, almost all identical
    assert worst <= 1
    assert exact >= MIN_EXACT


@pytest.mark.slow
def test_qdq_squeezenet_matches_onnxruntime(qdq_squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN SqueezeNet 1.0 quantized to QDQ (26 integer convolutions, concats, pools, softmax)
    # WHEN compiled for ml_c4 and run beside ONNX Runtime on the same QDQ model
    worst, exact = _agreement(qdq_squeezenet_dir, tmp_path, "data_0", (1, 3, 224, 224))
    # THEN at most 1 quantized unit apart
    assert worst <= 1
    assert exact >= MIN_EXACT


def _has_vnni() -> bool:
    return "avx512_vnni" in (kiln.runtime.cpu_flags() or set())


def _build(model_dir: Path, mcpu: str, tmp_path: Path, shape: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[object, str]:
    """(VM executable, disassembly) of the QDQ model compiled by Kiln's CPU pipeline for ``mcpu``."""
    mod = from_onnx(onnx.load(str(model_dir / "model.onnx")), shape_dict={"input": list(shape)},
                    keep_params_in_input=False)
    return compile_and_disassemble(mod, mcpu, tmp_path / f"{mcpu}.so")


@pytest.mark.parametrize("mcpu, vnni", [("cascadelake", True), ("znver4", True), ("haswell", False)])
def test_integer_convs_use_vpdpbusd_where_the_target_has_vnni(qdq_small_cnn_dir: Path, tmp_path: Path,
                                                              mcpu: str, vnni: bool) -> None:
    # GIVEN the QDQ small CNN (two of its three convolutions have input channels in multiples of 4)
    # WHEN compiled for a target with AVX512-VNNI, or for AVX2 only
    _, asm = _build(qdq_small_cnn_dir, mcpu, tmp_path)
    # THEN the VNNI targets' code multiplies with vpdpbusd; the AVX2 code has none (it would SIGILL) and
    # multiplies with vpmaddwd instead (ADR 0059)
    assert ("vpdpbusd" in asm) is vnni
    assert ("vpmaddwd" in asm) is not vnni


@pytest.mark.skipif(not _has_vnni(), reason="the host has no AVX512-VNNI")
def test_vnni_kernels_match_onnxruntime(qdq_small_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN the QDQ small CNN compiled with vpdpbusd kernels for this host's ISA
    import tvm
    from tvm import relax

    executable, _ = _build(qdq_small_cnn_dir, "cascadelake", tmp_path)
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype("float32")
    # WHEN it and ONNX Runtime run the same input
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    qdq = onnx.load(str(qdq_small_cnn_dir / "model.onnx"))
    (ref,) = reference_session(qdq.SerializeToString()).run(
        None, {"input": x})
    # THEN at most 1 quantized unit apart
    assert np.rint(np.abs(out - ref) / _output_scale(qdq)).max() <= 1


def test_batch_norms_and_residual_add_fuse_into_the_integer_convs(qdq_residual_block_dir: Path) -> None:
    # GIVEN a QDQ ResNet bottleneck whose batch norms quantize_static left unfolded
    # (conv -> Q -> DQ -> batch norm -> Q -> DQ -> ..., a projection shortcut, Sum, Relu)
    import tvm
    from kiln_compiler.graph import PerTensorQDQToArithmetic, SimplifyRequantization, cpu_graph_passes
    from kiln_compiler.pipeline import _fuse_passes

    mod = from_onnx(onnx.load(str(qdq_residual_block_dir / "model.onnx")), shape_dict={"input": [1, 16, 16, 16]},
                    keep_params_in_input=False)
    # WHEN the CPU graph passes run and FuseOps groups the kernels
    qdq = PerTensorQDQToArithmetic()
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        mod = tvm.transform.Sequential([QuantizedConvToInteger(), qdq, *cpu_graph_passes(16),
                                        SimplifyRequantization()])(mod)
        fused = tvm.transform.Sequential(_fuse_passes())(mod)
    kernels = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # THEN the Q/DQ around the batch norms and the Sum became arithmetic, and every batch norm,
    # requantization and the residual add run in the epilogues of the four integer convolutions:
    # besides them only the input's quantize, the pool and the output's flatten remain
    assert qdq.rewritten >= 8
    assert sum("conv2d" in k for k in kernels) == 4
    others = sorted(k for k in kernels if "conv2d" not in k)
    assert len(others) == 3 and not any("quantize" in k for k in kernels), others
    # the pool reads the NHWC activations as they are (no transpose before the graph's output edge)
    assert [k for k in others if "mean" in k and "transpose" not in k], others


def test_qdq_residual_block_matches_onnxruntime(qdq_residual_block_dir: Path, tmp_path: Path) -> None:
    # GIVEN the QDQ bottleneck (unfolded batch norms, projection shortcut)
    # WHEN compiled for ml_c4 (AVX2) and run beside ONNX Runtime on the same QDQ model
    worst, exact = _agreement(qdq_residual_block_dir, tmp_path, "input", (1, 16, 16, 16))
    # THEN at most 1 quantized unit apart, almost all identical
    assert worst <= 1
    assert exact >= MIN_EXACT


@pytest.mark.skipif(not _has_vnni(), reason="the host has no AVX512-VNNI")
def test_vnni_residual_block_matches_onnxruntime(qdq_residual_block_dir: Path, tmp_path: Path) -> None:
    # GIVEN the QDQ bottleneck compiled with vpdpbusd kernels (fused batch norm / residual epilogues)
    import tvm
    from tvm import relax

    executable, asm = _build(qdq_residual_block_dir, "cascadelake", tmp_path, (1, 16, 16, 16))
    assert "vpdpbusd" in asm
    x = np.random.default_rng(7).standard_normal((1, 16, 16, 16)).astype("float32")
    # WHEN it and ONNX Runtime run the same input
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    qdq = onnx.load(str(qdq_residual_block_dir / "model.onnx"))
    (ref,) = reference_session(qdq.SerializeToString()).run(
        None, {"input": x})
    # THEN at most 1 quantized unit apart, almost all identical
    units = np.rint(np.abs(out - ref) / _output_scale(qdq))
    assert units.max() <= 1
    assert np.mean(units == 0) >= MIN_EXACT


def test_pools_concats_and_shuffles_move_8bit_values(qdq_data_movement_dir: Path) -> None:
    # GIVEN a QDQ model with a Q/DQ pair around its max pool, concat and channel shuffle (quantize_static)
    import tvm
    from kiln_compiler.graph import (
        EightBitDataMovement,
        PerTensorQDQToArithmetic,
        SimplifyRequantization,
        cpu_graph_passes,
    )

    mod = from_onnx(onnx.load(str(qdq_data_movement_dir / "model.onnx")), shape_dict={"input": [1, 3, 46, 46]},
                    keep_params_in_input=False)
    moves = EightBitDataMovement()
    # WHEN the rewrite runs, and then the CPU graph passes for a VNNI target
    rewritten = moves(QuantizedConvToInteger()(mod))
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        graph = tvm.transform.Sequential([PerTensorQDQToArithmetic(), *cpu_graph_passes(16),
                                          SimplifyRequantization()])(rewritten)
    # THEN the pool, the concat, the shuffle's reshapes and transpose and the final flatten read 8-bit values,
    # not dequantized floats
    assert moves.rewritten == 6
    movers = ("relax.nn.max_pool2d", "relax.concat", "relax.reshape", "relax.permute_dims")
    inputs = [c.args[0] for c in _calls(rewritten) if c.op.name in movers]
    dtypes = [str(f.ty.dtype) for i in inputs for f in (i.fields if hasattr(i, "fields") else [i])]
    assert len(dtypes) == 7 and set(dtypes) == {"uint8"}, dtypes
    # the shuffle stays a shuffle in NHWC, no NCHW round trip
    axes = [[int(a) for a in c.attrs.axes] for c in _calls(graph) if c.op.name == "relax.permute_dims"]
    assert [0, 1, 2, 4, 3] in axes and [0, 2, 1, 3, 4] not in axes, axes
    # the 3-channel stem is a u8 x s8 convolution over 4 channels (the padded one's weights are 0), 24 output
    # columns wide (23 is prime: no VNNI tile of 8-16 pixels divides it), sliced back to 23; the grouped 1x1
    # convolution is u8 x s8 too (a batched matmul for the VNNI kernel), the depthwise one runs in fp32 on the
    # integer values
    convs = [c for c in _calls(rewritten) if c.op.name == "relax.nn.conv2d"]
    assert str(convs[0].args[0].ty.dtype) == "uint8" and int(convs[0].args[1].ty.shape[1]) == 4
    assert [int(d) for d in convs[0].ty.shape] == [1, 16, 23, 24]
    slices = [c for c in _calls(rewritten) if c.op.name == "relax.strided_slice"]
    assert [int(d) for d in slices[0].ty.shape] == [1, 16, 23, 23] and str(slices[0].ty.dtype) == "uint8"
    assert [str(c.args[0].ty.dtype) for c in convs if int(c.attrs.groups) > 1] == ["uint8", "float32"]
    # and the VNNI schedule takes all five integer kernels: four convolutions and the grouped matmul
    from kiln_compiler.pipeline import _cpu_kernels
    from kiln_compiler.schedules.int8 import VNNIConvSchedule

    vnni = VNNIConvSchedule()
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}) as tgt:
        vnni(_cpu_kernels(mod, tgt, True))
    assert len(vnni.scheduled) == 5 and sum("matmul" in k for k in vnni.scheduled) == 1, vnni.scheduled


@pytest.mark.parametrize("mcpu, vnni", [("znver4", True), ("haswell", False)])
def test_data_movement_cnn_matches_onnxruntime(qdq_data_movement_dir: Path, tmp_path: Path, mcpu: str,
                                               vnni: bool) -> None:
    # GIVEN the QDQ model with 8-bit pools, concat and shuffle, compiled for a VNNI target and an AVX2 one
    import tvm
    from tvm import relax

    executable, asm = _build(qdq_data_movement_dir, mcpu, tmp_path, (1, 3, 46, 46))
    assert ("vpdpbusd" in asm) is vnni
    if vnni and not _has_vnni():
        pytest.skip("the host has no AVX512-VNNI")
    x = np.random.default_rng(11).standard_normal((1, 3, 46, 46)).astype("float32")
    # WHEN it and ONNX Runtime run the same input
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    qdq = onnx.load(str(qdq_data_movement_dir / "model.onnx"))
    (ref,) = reference_session(qdq.SerializeToString()).run(
        None, {"input": x})
    # THEN at most 1 quantized unit apart, almost all identical
    units = np.rint(np.abs(out - ref) / _output_scale(qdq))
    assert units.max() <= 1
    assert np.mean(units == 0) >= MIN_EXACT


def test_grouped_pointwise_convs_with_odd_group_widths_run_vnni_with_their_epilogue(
        qdq_grouped_pointwise_dir: Path, tmp_path: Path) -> None:
    # GIVEN grouped 1x1 convolutions with 6 and 20 input, 20 and 17 output channels per group (ShuffleNet's)
    import tvm
    from kiln_compiler.pipeline import _cpu_kernels
    from kiln_compiler.schedules.int8 import VNNIConvSchedule
    from tvm import relax

    mod = from_onnx(onnx.load(str(qdq_grouped_pointwise_dir / "model.onnx")), shape_dict={"input": [1, 3, 16, 16]},
                    keep_params_in_input=False)
    # WHEN Kiln's CPU graph passes and fusion run for a VNNI target
    vnni = VNNIConvSchedule()
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}) as tgt:
        kernels = _cpu_kernels(mod, tgt, True)
    # THEN both are u8 x s8 batched matmuls over 8 and 20 input channels per group (6 padded to 8), each with
    # its requantizing epilogue in the same kernel (not a separate pass over the s32 result), and the VNNI
    # schedule takes both
    matmuls = {gv.name_hint: f for gv, f in kernels.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}
    assert len(matmuls) == 2, list(matmuls)
    assert all("round" in name for name in matmuls), list(matmuls)
    from kiln_compiler.schedules.tir import match_group_matmul

    widths = sorted(int(match_group_matmul(f, ("uint8", "int8", "int32"))[2][4])  # type: ignore[index]
                    for f in matmuls.values())
    assert widths == [8, 20], widths
    vnni(kernels)
    assert sum("matmul" in k for k in vnni.scheduled) == 2, vnni.scheduled
    # and the compiled model agrees with ONNX Runtime on the same QDQ model within 1 quantized unit
    executable, asm = _build(qdq_grouped_pointwise_dir, "znver4", tmp_path, (1, 3, 16, 16))
    assert "vpdpbusd" in asm
    if not _has_vnni():
        pytest.skip("the host has no AVX512-VNNI")
    x = np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype("float32")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    qdq = onnx.load(str(qdq_grouped_pointwise_dir / "model.onnx"))
    (ref,) = reference_session(qdq.SerializeToString()).run(
        None, {"input": x})
    units = np.rint(np.abs(out - ref) / _output_scale(qdq))
    assert units.max() <= 1
    assert np.mean(units == 0) >= MIN_EXACT


def test_residual_add_after_a_grouped_pointwise_conv_runs_in_its_vnni_kernel(
        qdq_grouped_residual_dir: Path, tmp_path: Path) -> None:
    # GIVEN a QDQ ShuffleNet-style residual: grouped 1x1 conv (4 x 34 channels), the block's input added, relu
    import tvm
    from kiln_compiler.pipeline import _cpu_kernels
    from kiln_compiler.schedules.int8 import VNNIConvSchedule
    from tvm import relax

    mod = from_onnx(onnx.load(str(qdq_grouped_residual_dir / "model.onnx")), shape_dict={"input": [1, 3, 16, 16]},
                    keep_params_in_input=False)
    # WHEN Kiln's CPU graph passes and fusion run for a VNNI target
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}) as tgt:
        kernels = _cpu_kernels(mod, tgt, True)
    # THEN both grouped convs are u8 x s8 matmul kernels, and the second one reads the residual (the stem's u8
    # output, in the (pixels, groups, 1, 34) view) itself: the dequantize, the add, the relu and the requantize
    # are in its kernel, not a separate pass over its fp32 output (ADR 0051)
    matmuls = {gv.name_hint: f for gv, f in kernels.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}
    assert len(matmuls) == 2, list(matmuls)

    def tensors(func: tvm.tirx.PrimFunc) -> list[tuple[tuple[int, ...], str]]:
        return [(tuple(int(d) for d in b.shape), str(b.dtype)) for b in func.params]  # TVM 0.27: the buffers

    assert all(tensors(f)[0] == ((256, 4, 1, 36), "uint8") for f in matmuls.values())  # 34 padded to 36
    residual = [f for f in matmuls.values() if ((256, 4, 1, 34), "uint8") in tensors(f)[1:-1]]
    assert len(residual) == 1, [tensors(f) for f in matmuls.values()]
    vnni = VNNIConvSchedule()
    vnni(kernels)
    assert sum("matmul" in k for k in vnni.scheduled) == 2, vnni.scheduled
    # and the compiled model agrees with ONNX Runtime on the same QDQ model within 1 quantized unit
    executable, asm = _build(qdq_grouped_residual_dir, "znver4", tmp_path, (1, 3, 16, 16))
    assert "vpdpbusd" in asm
    if not _has_vnni():
        pytest.skip("the host has no AVX512-VNNI")
    x = np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype("float32")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    qdq = onnx.load(str(qdq_grouped_residual_dir / "model.onnx"))
    (ref,) = reference_session(qdq.SerializeToString()).run(
        None, {"input": x})
    units = np.rint(np.abs(out - ref) / _output_scale(qdq))
    assert units.max() <= 1
    assert np.mean(units == 0) >= MIN_EXACT


def test_dense_block_preactivations_stay_nhwc(qdq_dense_block_dir: Path) -> None:
    # GIVEN a QDQ DenseNet block as quantize_static writes the light DenseNet-121: each pre-activation is
    # BatchNormalization -> Mul -> Add with a Q/DQ pair around each, its per-channel (C, 1, 1) Mul/Add
    # constants quantized as activations (quantize -> dequantize of a constant until folded)
    import tvm
    from kiln_compiler.pipeline import _cpu_kernels

    mod = from_onnx(onnx.load(str(qdq_dense_block_dir / "model.onnx")), shape_dict={"input": [1, 16, 16, 16]},
                    keep_params_in_input=False)
    # WHEN Kiln's CPU graph passes and fusion run for a VNNI target
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}) as tgt:
        kernels = [gv.name_hint for gv, f in _cpu_kernels(mod, tgt, True).functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc)]
    # THEN the pre-activations, concats and pools run in NHWC: the only transposes left are the graph's edges
    # (the input's, fused with its quantize and pad, and the classifier output's), none inside a kernel of a
    # pre-activation or concat (they went NCHW and back around every one of them)
    transposing = sorted(k for k in kernels if "transpose" in k)
    assert len(transposing) == 2 and any("pad" in k for k in transposing), transposing
    assert not any("concatenate" in k or "avg_pool" in k for k in transposing), transposing
    # the two concats each fused with the pre-activation that reads them
    assert sum("concatenate" in k and "round" in k for k in kernels) == 2, kernels


@pytest.mark.parametrize("mcpu, vnni", [("znver4", True), ("haswell", False)])
def test_dense_layers_match_onnxruntime(qdq_dense_layers_dir: Path, tmp_path: Path, mcpu: str, vnni: bool) -> None:
    # GIVEN the QDQ DenseNet layers (stem, two dense layers with their concats, the transition's pre-activation
    # and 1x1 convolution) compiled for a VNNI target and an AVX2 one
    import tvm
    from tvm import relax

    executable, asm = _build(qdq_dense_layers_dir, mcpu, tmp_path, (1, 16, 16, 16))
    assert ("vpdpbusd" in asm) is vnni
    if vnni and not _has_vnni():
        pytest.skip("the host has no AVX512-VNNI")
    qdq = onnx.load(str(qdq_dense_layers_dir / "model.onnx"))
    session = reference_session(qdq.SerializeToString())
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for seed in (3, 4):
        x = np.random.default_rng(seed).standard_normal((1, 16, 16, 16)).astype("float32")
        # WHEN it and ONNX Runtime run the same input
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        (ref,) = session.run(None, {"input": x})
        # THEN at most 1 quantized unit apart, almost all identical (measured: identical)
        units = np.rint(np.abs(out - ref) / _output_scale(qdq))
        assert units.max() <= 1
        assert np.mean(units == 0) >= MIN_EXACT
