"""bf16 DenseNet and Inception layers (ADR 0053): transitions pooled before their 1x1 convolution, batch-norm
chains as one multiply-add, a convolution short of whole 16-channel blocks padded where its input is bf16 anyway.

The first two rewrites are exact in real arithmetic and change fp32 rounding only; they run in fp32 builds too. Tolerance as in test_bf16.py: each bf16 layer may add ~2^-8 of its output's scale;
``dense_block_cnn`` has seven bf16 layers (stem, two 1x1 + 3x3 dense layers, the transition, the classifier),
asserted at 4 x 7 x 2^-8 of the largest output. A pool or scale applied to the wrong channels or pixels is off
by the order of the output itself.
"""

from __future__ import annotations

import kiln.runtime
import numpy as np
import onnxruntime as ort
import pytest
import tvm
from kiln_compiler.graph import cpu_graph_passes
from kiln_compiler.graph.affine import FoldChannelAffine
from kiln_compiler.graph.bf16 import ConvToBF16
from kiln_compiler.graph.pool_first import PoolBeforePointwiseConv
from kiln_compiler.pipeline import compile_relax
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import dense_block_cnn, fire_lrn_cnn

BF16_LAYER_ERROR = 2.0**-8
ZEN4 = {"kind": "llvm", "mcpu": "znver4"}
SHAPE = (1, 16, 16, 16)


def _relax() -> tvm.IRModule:
    return from_onnx(dense_block_cnn(), shape_dict={"input": list(SHAPE)}, keep_params_in_input=False)


def _cpu_graph() -> tvm.IRModule:
    with tvm.target.Target(ZEN4):
        return tvm.transform.Sequential(cpu_graph_passes(16))(_relax())


def _lines(mod: tvm.IRModule) -> list[str]:
    return [ln.strip() for ln in mod["main"].script(show_meta=False).splitlines()]


def test_transition_pools_before_its_pointwise_convolution() -> None:
    # GIVEN the dense block CNN in the CPU layout: transition = pre-activation, 1x1 conv 64 -> 32 at 16x16, 2x2 pool
    before = _lines(_cpu_graph())
    assert any("R.nn.avg_pool2d(" in ln and "(1, 8, 8, 32)" in ln for ln in before)
    full = sum("R.nn.conv2d(" in ln and "(1, 16, 16, 32)" in ln for ln in before)  # stem, 2 dense 1x1, transition
    # WHEN the pool is moved
    moved = PoolBeforePointwiseConv()
    lines = _lines(moved(_cpu_graph()))
    # THEN the pool reads the 64-channel pre-activation and the convolution runs on its 8x8 result
    assert moved.moved == 1
    assert any("R.nn.avg_pool2d(" in ln and "(1, 8, 8, 64)" in ln for ln in lines)
    convs = [ln for ln in lines if "R.nn.conv2d(" in ln and "(1, 8, 8, 32)" in ln]
    assert len(convs) == 1
    # and the transition's convolution at 16x16 is gone (the stem and dense 1x1 layers keep theirs)
    assert sum("R.nn.conv2d(" in ln and "(1, 16, 16, 32)" in ln for ln in lines) == full - 1 == 3


def test_a_convolution_read_elsewhere_or_a_3x3_is_not_moved() -> None:
    # GIVEN a 1x1 convolution whose result is also returned, and a 3x3 convolution, each before an average pool
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "float32"))
    w1 = relax.const(np.ones((1, 1, 16, 32), "float32"))
    w3 = relax.const(np.ones((3, 3, 16, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w1, data_layout="NHWC", kernel_layout="HWIO"))
            z = bb.emit(relax.op.nn.conv2d(x, w3, padding=1, data_layout="NHWC", kernel_layout="HWIO"))
            py = bb.emit(relax.op.nn.avg_pool2d(y, 2, 2, layout="NHWC"))
            pz = bb.emit(relax.op.nn.avg_pool2d(z, 2, 2, layout="NHWC"))
            out = bb.emit_output(relax.Tuple([y, py, pz]))
        bb.emit_func_output(out)
    # WHEN the pass runs  THEN neither pool moves
    moved = PoolBeforePointwiseConv()
    moved(bb.get())
    assert moved.moved == 0


def test_batch_norm_chains_become_one_multiply_add() -> None:
    # GIVEN the dense block CNN: 7 pre-activations, each batch norm (subtract, multiply, multiply, add) -> Mul -> Add
    graph = _cpu_graph()
    assert sum("R.subtract(" in ln for ln in _lines(graph)) == 7
    # WHEN the chains are folded
    fold = FoldChannelAffine()
    lines = _lines(fold(graph))
    # THEN each is one multiply and one add: no subtract left, 7 multiplies and 7 adds
    assert fold.folded == 7
    assert not any("R.subtract(" in ln for ln in lines)
    assert sum("R.multiply(" in ln for ln in lines) == 7 and sum("R.add(" in ln for ln in lines) == 7


@pytest.mark.skipif("avx512_bf16" not in (kiln.runtime.cpu_flags() or set()),
                    reason="the host has no AVX512-BF16 to run the bf16 code")
def test_bf16_dense_block_with_both_rewrites_agrees_with_fp32() -> None:
    # GIVEN the dense block CNN built in bf16 (both rewrites run there) and ONNX Runtime running it in fp32
    compiled = compile_relax(_relax(), ZEN4, precision="bf16")
    assert compiled.unscheduled == []
    x = np.random.default_rng(5).standard_normal(SHAPE).astype("float32")
    (ref,) = ort.InferenceSession(dense_block_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    # WHEN it runs
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    # THEN within seven bf16 layers' error of the output's scale, and not bit-identical (bf16 really ran)
    error = float(np.abs(out - ref).max())
    assert 0 < error <= 4 * 7 * BF16_LAYER_ERROR * float(np.abs(ref).max())


def test_fp32_build_pools_first_and_agrees_with_onnx_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the dense block CNN built in fp32 for AVX2 (runs on every x86 host here), the pool move observed
    import kiln_compiler.pipeline as pipeline

    passes: list[PoolBeforePointwiseConv] = []

    class Observed(PoolBeforePointwiseConv):
        def __init__(self) -> None:
            super().__init__()
            passes.append(self)

    monkeypatch.setattr(pipeline, "PoolBeforePointwiseConv", Observed)
    compiled = compile_relax(_relax(), {"kind": "llvm", "mcpu": "haswell"})
    assert compiled.unscheduled == []
    x = np.random.default_rng(6).standard_normal(SHAPE).astype("float32")
    (ref,) = ort.InferenceSession(dense_block_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    # WHEN it runs
    out = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    # THEN the transition's pool moved before its convolution, and the output is ONNX Runtime's to fp32 rounding
    assert [p.moved for p in passes] == [1]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _branch_weights() -> list[np.ndarray]:
    """OIHW weights of ``_branches``: 1x1 32 -> 24, 3x3 24 -> 16, the sibling 1x1 32 -> 16."""
    rng = np.random.default_rng(7)
    return [(rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype("float32")
            for s in ((24, 32, 1, 1), (16, 24, 3, 3), (16, 32, 1, 1))]


def _branches(with_sibling: bool) -> tvm.IRModule:
    """An Inception-like module, NCHW: a 1x1 convolution 32 -> 24 (relu, 3x3 24 -> 16) beside, if ``with_sibling``,
    a 1x1 convolution 32 -> 16 reading the same input, concatenated; input [1, 32, 8, 8]."""
    w24, w3, w16 = (relax.const(w) for w in _branch_weights())
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w24)))
            y = bb.emit(relax.op.nn.conv2d(y, w3, padding=1))
            if with_sibling:
                y = bb.emit(relax.op.concat([bb.emit(relax.op.nn.conv2d(x, w16)), y], axis=1))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _branches_numpy(x: np.ndarray) -> np.ndarray:
    """``_branches(True)`` in float64 numpy."""
    w24, w3, w16 = (w.astype("float64") for w in _branch_weights())
    y = np.maximum(np.einsum("oi,nihw->nohw", w24[:, :, 0, 0], x), 0)
    p = np.pad(y, [(0, 0), (0, 0), (1, 1), (1, 1)])
    z = sum(np.einsum("oi,nihw->nohw", w3[:, :, i, j], p[:, :, i:i + 8, j:j + 8]) for i in range(3) for j in range(3))
    return np.concatenate([np.einsum("oi,nihw->nohw", w16[:, :, 0, 0], x), z], axis=1)


@pytest.mark.parametrize("with_sibling", [True, False])
def test_a_24_channel_convolution_is_padded_only_beside_bf16_convolutions(with_sibling: bool) -> None:
    # GIVEN the module in the CPU layout: the 24-channel 1x1 convolution with or without a 16-channel sibling
    with tvm.target.Target(ZEN4):
        mod = tvm.transform.Sequential(cpu_graph_passes(16))(_branches(with_sibling))
        # WHEN ConvToBF16 runs
        rewrite = ConvToBF16()
        text = rewrite(mod)["main"].script(show_meta=False)
    # THEN beside the sibling it is a bf16 convolution to 32 channels sliced back to 24: all convolutions are bf16
    if with_sibling:
        assert rewrite.converted == 3
        assert 'R.Tensor((1, 8, 8, 32), dtype="float32") = R.nn.conv2d(' in text
        assert "R.strided_slice(" in text and "(1, 8, 8, 24)" in text
    else:  # alone it stays fp32 (padding costs a third more work there for nothing else)
        assert rewrite.converted == 1 and "R.strided_slice(" not in text


@pytest.mark.skipif("avx512_bf16" not in (kiln.runtime.cpu_flags() or set()),
                    reason="the host has no AVX512-BF16 to run the bf16 code")
def test_padded_bf16_branch_agrees_with_float64() -> None:
    # GIVEN the module with the sibling built in bf16, and its result in float64 numpy
    x = np.random.default_rng(8).standard_normal((1, 32, 8, 8)).astype("float32")
    compiled = compile_relax(_branches(True), ZEN4, precision="bf16")
    assert compiled.unscheduled == []
    ref = _branches_numpy(x)
    # WHEN it runs
    out = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    # THEN within two bf16 layers' error of the output's scale (a padded channel in the slice would be off by more)
    error = float(np.abs(out - ref).max())
    assert 0 < error <= 4 * 2 * BF16_LAYER_ERROR * float(np.abs(ref).max())


def _lrn_kernel(precision: str) -> str:
    """The scheduled TIR of the LRN kernel of ``fire_lrn_cnn``'s ``precision`` build."""
    from kiln_compiler import pipeline
    from kiln_compiler.schedules import target_vector_unit
    from kiln_compiler.schedules.cpu import default_schedule

    mod = from_onnx(fire_lrn_cnn(), shape_dict={"input": [1, 3, 32, 32]}, keep_params_in_input=False)
    with tvm.target.Target(ZEN4) as tgt:
        fused = pipeline._cpu_kernels(mod, tgt, True, precision)
        (func,) = [f for gv, f in fused.functions_items() if "sqrt" in gv.name_hint]
        return str(default_schedule(func, target_vector_unit(tgt)).mod["main"].script())


def test_bf16_lrn_computes_its_padded_squares_per_pixel_fp32_keeps_them_inlined() -> None:
    # GIVEN the fire + LRN CNN's LRN kernel (16 channels, window 5)  WHEN scheduled in a bf16 and an fp32 build
    bf16, fp32 = _lrn_kernel("bf16"), _lrn_kernel("fp32")
    # THEN in bf16 the padded squares (20 channels) are a per-pixel row under the parallel loop, read without selects
    assert 'with T.sblock("PadInput")' in bf16 and "T.if_then_else" in bf16.split('T.sblock("PadInput")')[1][:800]
    assert "T.if_then_else" not in bf16.split('T.sblock("PadInput")')[1].split("T.sblock(")[1]
    # and fp32 keeps the inlined bounds checks (its schedule, and so its outputs, unchanged)
    assert 'T.sblock("PadInput")' not in fp32 and "T.if_then_else" in fp32


@pytest.mark.skipif("avx512_bf16" not in (kiln.runtime.cpu_flags() or set()),
                    reason="the host has no AVX512-BF16 to run the bf16 code")
def test_bf16_lrn_per_pixel_pad_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the fire + LRN CNN built in bf16 with the per-pixel pad and with the inlined schedule
    from kiln_compiler.schedules import cpu

    mod = from_onnx(fire_lrn_cnn(), shape_dict={"input": [1, 3, 32, 32]}, keep_params_in_input=False)
    x = tvm.runtime.tensor(np.random.default_rng(9).standard_normal((1, 3, 32, 32)).astype("float32"))
    outs = []
    for per_pixel in (True, False):
        if not per_pixel:
            monkeypatch.setattr(cpu, "schedule_channel_window", lambda *_: None)
        compiled = compile_relax(mod, ZEN4, precision="bf16")
        outs.append(relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](x).numpy())
    # WHEN compared  THEN bit-identical: the same sums in the same order, only the pad's reads moved
    np.testing.assert_array_equal(outs[0], outs[1])
