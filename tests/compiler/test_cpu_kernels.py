"""Kiln's NHWC register-tiled CPU kernels against the unscheduled (NCHW, plain TOPI) build.

Tolerance: fp32 summation order differs (tiles, vector lanes), so rtol/atol 1e-4 on
unit-scale data; whole models compare logits with 1e-3 of their largest magnitude.
"""

from __future__ import annotations

import os
import re
from typing import Any

import kiln.runtime
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402
from kiln_compiler.pipeline import compile_relax  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from tests.compiler.conftest import shuffle_unit  # noqa: E402

os.environ.setdefault("TVM_NUM_THREADS", "2")
AVX2 = {"kind": "llvm", "mcpu": "haswell"}  # every x86 CI host has it
RTOL, ATOL = 1e-4, 1e-4


def _has_avx512() -> bool:
    return "avx512f" in (kiln.runtime.cpu_flags() or set())


TARGETS = [AVX2] + ([{"kind": "llvm", "mcpu": "skylake-avx512"}] if _has_avx512() else [])


def assert_tile_variants_match_unscheduled(func: Any, vector: Any, seed: int) -> None:
    """Every distinct schedule of ``func`` that tuning's tile variants give (none may fail: tuning would
    lose that candidate; more than three distinct) computes what the unscheduled kernel computes on AVX2."""
    from kiln_compiler.schedules import default_schedule, tile_variants

    schedules = {}
    for knobs in tile_variants():
        mod = default_schedule(func, vector, knobs).mod
        schedules[tvm_ffi.structural_hash(mod)] = mod["main"]
    assert len(schedules) > 3  # the knobs change the tile
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal([int(d) for d in buf.shape]).astype("float32") for buf in func.params]

    def run(f: Any) -> np.ndarray:
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=AVX2)
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        return tensors[-1].numpy()

    want = run(func)
    assert not np.allclose(want, args[-1])
    for scheduled in schedules.values():
        np.testing.assert_allclose(run(scheduled), want, rtol=RTOL, atol=ATOL)


def _run(mod: Any, x: np.ndarray, target: dict[str, Any], default_schedules: bool) -> np.ndarray:
    compiled = compile_relax(mod, target, default_schedules=default_schedules)
    # a kernel the default schedule fails on silently keeps TVM's (correct, slow) loops
    assert compiled.unscheduled == []
    ex = compiled.executable
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _conv_block(cin: int, cout: int, k: int, stride: int, pad: int, hw: int, groups: int, seed: int) -> Any:
    """conv2d (+ per-channel bias, batch-norm-like scale, relu) with constant weights."""
    rng = np.random.default_rng(seed)
    w = relax.const(rng.standard_normal((cout, cin // groups, k, k)).astype("float32") / np.sqrt(cin * k * k / groups))
    bias = relax.const(rng.standard_normal((1, cout, 1, 1)).astype("float32"))
    scale = relax.const(rng.uniform(0.5, 1.5, (1, cout, 1, 1)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, cin, hw, hw), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad, groups=groups))
            y = bb.emit(relax.op.multiply(relax.op.add(y, bias), scale))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


CONVS = {
    # name: (cin, cout, k, stride, pad, hw, groups)
    "3x3_s1": (64, 64, 3, 1, 1, 14, 1),
    "1x1": (256, 64, 1, 1, 0, 28, 1),
    "1x1_s2": (64, 128, 1, 2, 0, 28, 1),
    "7x7_s2_rgb": (3, 64, 7, 2, 3, 56, 1),
    "3x3_s2": (32, 64, 3, 2, 1, 28, 1),
    "odd_width": (16, 48, 3, 1, 1, 13, 1),
    "channels_not_vector_multiple": (12, 1000, 1, 1, 0, 13, 1),
    "channels_24": (3, 24, 3, 2, 1, 29, 1),
    "grouped": (240, 240, 1, 1, 0, 14, 3),
    "grouped_width_not_vector_multiple": (272, 272, 1, 1, 0, 14, 4),  # ShuffleNet: 4 x 68
    "grouped_3x3_s2": (96, 96, 3, 2, 1, 15, 2),
    "channels_60": (32, 60, 3, 1, 1, 14, 1),  # padded to 64 on both ISAs
    "channels_48": (16, 48, 3, 1, 1, 14, 1),  # three vectors on AVX-512 (24 channels: on AVX2)
    "grouped_4x136_at_7x7": (544, 544, 1, 1, 0, 7, 4),  # 136 -> 144 per group: 3 AVX-512 vectors
    # maps without a row tile on AVX2 (13, 7): tiles over the fused H*W axis with a tail (ADR 0025)
    "1x1_at_13x13_odd_vectors": (64, 200, 1, 1, 0, 13, 1),  # 25 AVX2 vectors: padded to 26
    "3x3_at_13x13": (32, 64, 3, 1, 1, 13, 1),
    "1x1_at_7x7": (128, 256, 1, 1, 0, 7, 1),
    "3x3_s2_to_7x7": (64, 128, 3, 2, 1, 14, 1),
    # input rows 4 KiB apart: every pixel's stream in one L1 set, tiles of at most 7 pixels (schedules/l1.py)
    "1x1_from_1024_at_14x14": (1024, 64, 1, 1, 0, 14, 1),
    "1x1_s2_from_512_to_14x14": (512, 64, 1, 2, 0, 28, 1),
    "depthwise_3x3": (60, 60, 3, 1, 1, 14, 60),
    "depthwise_3x3_s2": (60, 60, 3, 2, 1, 15, 60),
}


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_kernel_matches_unscheduled(name: str, target: dict[str, Any]) -> None:
    # GIVEN a conv2d block of a shape that real models use
    cin, cout, k, stride, pad, hw, groups = CONVS[name]
    mod = _conv_block(cin, cout, k, stride, pad, hw, groups, seed=len(name))
    x = np.random.default_rng(0).standard_normal((1, cin, hw, hw)).astype("float32")
    # WHEN built with Kiln's kernels and without any schedule
    got, want = _run(mod, x, target, True), _run(mod, x, target, False)
    # THEN the outputs agree
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
@pytest.mark.parametrize(("channels", "hw"), [(136, 14), (272, 7)])
def test_shuffle_unit_matches_unscheduled(channels: int, hw: int, target: dict[str, Any]) -> None:
    # GIVEN a ShuffleNet unit (4 groups of 34 or 68 channels, neither a whole number of vectors)
    mod = shuffle_unit(channels, 4, hw)
    x = np.random.default_rng(1).standard_normal((1, channels, hw, hw)).astype("float32")
    # WHEN built with Kiln's kernels and without any schedule  THEN the outputs agree
    np.testing.assert_allclose(_run(mod, x, target, True), _run(mod, x, target, False), rtol=RTOL, atol=ATOL)


def test_shuffle_unit_runs_one_kernel_per_grouped_conv_in_nhwc() -> None:
    # GIVEN a ShuffleNet unit
    from kiln_compiler.graph import cpu_graph_passes

    mod = shuffle_unit(136, 4, 14)
    # WHEN converted for an AVX2 target
    with tvm.target.Target(AVX2):
        text = tvm.transform.Sequential(cpu_graph_passes(8))(mod)["main"].script()
    # THEN each grouped 1x1 conv is one batched matmul over the group axis (no per-group
    #      convolutions and no concat); the shuffle is read through the second one's input index
    #      (ADR 0044): the only transposes to NCHW and back are at the graph's edges
    assert text.count("R.matmul(") == 1 and text.count("shuffled_matmul") == 1
    assert "R.concat(" not in text and text.count("R.nn.conv2d(") == 1  # the depthwise conv
    assert text.count("R.permute_dims(") == 2, text
    assert "axes=[0, 1, 2, 4, 3]" not in text
    # AND the shift and relu after the first grouped conv run on its (pixels, groups, 1, channels) result,
    #     before the slice of its padded channels and the reshape to NHWC; its scale is in its weights (ADR 0054)
    assert text.index("R.matmul(") < text.index("R.add(") < text.index("R.nn.relu(") < text.index("R.strided_slice(")
    assert "R.multiply(" not in text


def test_pool_concat_sum_match_unscheduled() -> None:
    # GIVEN two conv branches, an ONNX-style Sum (stack + sum), concat, max-pool and mean
    rng = np.random.default_rng(3)
    w1 = relax.const(rng.standard_normal((16, 8, 3, 3)).astype("float32") / 8)
    w2 = relax.const(rng.standard_normal((16, 8, 1, 1)).astype("float32") / 3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 8, 15, 15), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, w1, padding=1))
            b = bb.emit(relax.op.nn.conv2d(x, w2))
            s = bb.emit(relax.op.sum(relax.op.stack([a, b], axis=0), axis=[0]))
            c = bb.emit(relax.op.concat([s, a], axis=1))
            p = bb.emit(relax.op.nn.max_pool2d(c, pool_size=3, strides=2, padding=1))
            out = bb.emit_output(bb.emit(relax.op.mean(p, axis=[2, 3], keepdims=True)))
        bb.emit_func_output(out)
    xs = rng.standard_normal((1, 8, 15, 15)).astype("float32")
    # WHEN built both ways  THEN the outputs agree
    np.testing.assert_allclose(_run(bb.get(), xs, AVX2, True), _run(bb.get(), xs, AVX2, False), rtol=RTOL, atol=ATOL)


def _dense_block() -> Any:
    """DenseNet's pattern: conv, batch norm scaled by ONNX ``Unsqueeze``d (C, 1, 1) constants,
    relu, conv, concat."""
    rng = np.random.default_rng(4)
    c = 24
    w0 = relax.const(rng.standard_normal((c, c, 1, 1)).astype("float32") / 5)
    scale = relax.const(rng.uniform(0.5, 1.5, (c, 1, 1)).astype("float32"))
    shift = relax.const(rng.standard_normal((c, 1, 1)).astype("float32"))
    w1 = relax.const(rng.standard_normal((16, c, 3, 3)).astype("float32") / 12)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, c, 14, 14), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, w0))
            y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.multiply(a, scale), shift)))
            y = bb.emit(relax.op.nn.conv2d(y, w1, padding=1))
            out = bb.emit_output(bb.emit(relax.op.concat([a, y], axis=1)))
        bb.emit_func_output(out)
    return bb.get()


def test_lower_rank_constants_keep_nhwc() -> None:
    # GIVEN a DenseNet-style block whose batch-norm constants have rank 3
    from kiln_compiler.graph import cpu_graph_passes

    mod = _dense_block()
    # WHEN converted to NHWC
    with tvm.target.Target(AVX2):
        nhwc = tvm.transform.Sequential(cpu_graph_passes(8))(mod)
    text = nhwc.script()
    # THEN the only activation transposes are at the graph's input and output
    #      (a rank-3 constant used to keep each batch norm in NCHW between two transposes)
    transposes = [ln for ln in text.splitlines() if "R.permute_dims(" in ln and "metadata" not in ln]
    assert len(transposes) == 2, transposes
    # AND the block computes what the unscheduled build computes
    xs = np.random.default_rng(5).standard_normal((1, 24, 14, 14)).astype("float32")
    np.testing.assert_allclose(_run(mod, xs, AVX2, True), _run(mod, xs, AVX2, False), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("model_name", ["squeezenet", "shufflenet"])
def test_real_model_matches_unscheduled(model_name: str) -> None:
    # GIVEN a light real architecture (materialized weights) without its softmax
    from kiln_compiler.samples import input_shapes, load_light_model
    from tvm.relax.frontend.onnx import from_onnx

    model = load_light_model(model_name, strip_softmax=True)
    shapes = input_shapes(model)
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    x = np.random.default_rng(2).random(next(iter(shapes.values()))).astype("float32")
    # WHEN built with Kiln's kernels and without schedules
    got, want = _run(mod, x, AVX2, True), _run(mod, x, AVX2, False)
    # THEN logits agree to 1e-4 of their scale (a wrong tile would be off by far more)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_padded_input_is_materialised_outside_the_tile() -> None:
    # GIVEN a 3x3 convolution with padding 1, fused with its epilogue
    from kiln import isa
    from kiln_compiler import pipeline as tp
    from kiln_compiler.graph import cpu_graph_passes
    from kiln_compiler.schedules import default_schedule

    mod = _conv_block(64, 64, 3, 1, 1, 14, 1, seed=1)
    with tvm.target.Target(AVX2):
        fused = tvm.transform.Sequential(tp._fuse_passes())(tvm.transform.Sequential(cpu_graph_passes(8))(mod))
    (conv,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint]
    # WHEN Kiln's default schedule is applied
    text = default_schedule(conv, isa.VectorUnit(8, 16)).mod["main"].script()
    # THEN the bounds check lives in the pad copy, not in the tile's innermost update
    #      (inlined, it ran once per multiply-add and halved the speed of every 3x3 layer)
    update = text[text.index('T.sblock("conv2d_nhwc_update")'):]
    update = update[:update.index("T.sblock(", 20)] if "T.sblock(" in update[20:] else update
    assert "if_then_else" not in update
    assert "if_then_else" in text


def _anchor_tile(conv_func: Any, vector: Any) -> tuple[int, int]:
    """(pixels, channel vectors) of the register tile Kiln's default schedule gives a conv kernel."""
    from kiln_compiler.schedules import default_schedule

    sch = default_schedule(conv_func, vector)
    update = sch.get_sblock("conv2d_nhwc_update")
    # loops binding the output-channel axis (the block iterator of the output's innermost index;
    # the 4th in NHWC, the 3rd over a fused pixel axis) are channels (a 3-vector tile unrolls one
    # over its vectors), the other unrolled loops are pixels
    realize = sch.get(sch.get_loops(update)[-1]).body  # the innermost loop's block realize
    block = realize.block
    channel_iv = next(i for i, iv in enumerate(block.iter_vars)
                      if block.writes[0].region[-1].min.same_as(iv.var))
    channel_vars = {v.name for v in tvm.tirx.analysis.undefined_vars(realize.iter_values[channel_iv], [])}
    pixels, channels = 1, 1
    for loop in sch.get_loops(update):
        stmt = sch.get(loop)
        if stmt.kind == tvm.tirx.ForKind.VECTORIZED or (stmt.kind == tvm.tirx.ForKind.UNROLLED
                                                        and stmt.loop_var.name in channel_vars):
            channels *= int(stmt.extent)
        elif stmt.kind == tvm.tirx.ForKind.UNROLLED:
            pixels *= int(stmt.extent)
    return pixels, -(-channels // vector.lanes)


@pytest.mark.parametrize(("lanes", "registers"), [(8, 16), (16, 32), (4, 32)], ids=["avx2", "avx512", "neon"])
@pytest.mark.parametrize(("cin", "cout", "k", "hw"), [(512, 1000, 1, 13), (64, 256, 3, 13), (512, 512, 3, 7),
                                                      (64, 64, 1, 56), (3, 24, 3, 56), (16, 48, 3, 14)])
def test_register_tile_fills_the_register_file(lanes: int, registers: int, cin: int, cout: int, k: int,
                                               hw: int) -> None:
    # GIVEN a convolution over a map whose side has few divisors (13, 7) or many (56)
    from kiln import isa
    from kiln_compiler import pipeline as tp
    from kiln_compiler.graph import cpu_graph_passes

    vector = isa.VectorUnit(lanes, registers)
    mod = _conv_block(cin, cout, k, 1, k // 2, hw, 1, seed=2)
    with tvm.target.Target(AVX2):
        fused = tvm.transform.Sequential(tp._fuse_passes())(tvm.transform.Sequential(cpu_graph_passes(lanes))(mod))
    (conv,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint]
    # WHEN Kiln's default schedule tiles it for a vector unit
    pixels, vectors = _anchor_tile(conv, vector)
    # THEN accumulators, weight vectors and the broadcast fit the registers (no spills) and there
    #      are enough independent accumulators to hide the FMA latency (2 FMAs per cycle x 4
    #      cycles), or a whole row of a narrower map (1 pixel x 1 vector ran at FMA latency)
    assert pixels * vectors + vectors + 1 <= registers
    assert pixels * vectors >= min(hw, 8)


@pytest.mark.parametrize(("cin", "cout", "k", "hw"), [(64, 256, 3, 13), (32, 64, 1, 14)])
def test_neon_shaped_tile_matches_unscheduled_kernel(cin: int, cout: int, k: int, hw: int) -> None:
    # GIVEN a fused conv kernel and the tile Kiln gives it for 4-lane vectors with 32 registers
    #       (aarch64 NEON; no ARM host here, so the same TensorIR is compiled for this x86 host)
    from kiln import isa
    from kiln_compiler import pipeline as tp
    from kiln_compiler.graph import cpu_graph_passes
    from kiln_compiler.schedules import default_schedule

    vector = isa.VectorUnit(4, 32)
    mod = _conv_block(cin, cout, k, 1, k // 2, hw, 1, seed=3)
    with tvm.target.Target(AVX2):
        fused = tvm.transform.Sequential(tp._fuse_passes())(tvm.transform.Sequential(cpu_graph_passes(4))(mod))
    (conv,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint]
    pixels, vectors = _anchor_tile(conv, vector)
    assert pixels * vectors > 12  # more than a 16-register file would hold
    scheduled = default_schedule(conv, vector).mod["main"]
    rng = np.random.default_rng(7)
    args = [rng.standard_normal([int(d) for d in buf.shape]).astype("float32") for buf in conv.params]
    outputs = []
    # WHEN the scheduled and the unscheduled kernel run on the same inputs
    for func in (scheduled, conv):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=AVX2)
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        outputs.append(tensors[-1].numpy())
    # THEN they agree (and both wrote their output buffer, which started as noise)
    assert not np.allclose(outputs[1], args[-1])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=RTOL, atol=ATOL)


def _conv_kernel(cin: int, cout: int, k: int, stride: int, hw: int, lanes: int, pad: int | None = None) -> Any:
    """The fused conv PrimFunc (conv + bias + scale + relu, NHWC) Kiln's graph passes make for ``lanes``
    (padded by ``k // 2`` unless ``pad`` says otherwise)."""
    from kiln_compiler import pipeline as tp
    from kiln_compiler.graph import cpu_graph_passes

    mod = _conv_block(cin, cout, k, stride, k // 2 if pad is None else pad, hw, 1, seed=4)
    with tvm.target.Target(AVX2):
        fused = tvm.transform.Sequential(tp._fuse_passes())(tvm.transform.Sequential(cpu_graph_passes(lanes))(mod))
    (conv,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint]
    return conv


@pytest.mark.parametrize(("cin", "cout", "k", "hw"), [(512, 1000, 1, 13), (64, 256, 3, 13), (512, 512, 3, 7),
                                                      (512, 2048, 1, 7)])
def test_maps_without_a_row_tile_get_two_vector_tiles_on_avx2(cin: int, cout: int, k: int, hw: int) -> None:
    # GIVEN a convolution over a 13x13 or 7x7 map (no row tile between 1 and the whole row) on AVX2
    from kiln import isa

    vector = isa.VectorUnit(8, 16)
    conv = _conv_kernel(cin, cout, k, 1, hw, vector.lanes)
    # WHEN Kiln's default schedule tiles it
    pixels, vectors = _anchor_tile(conv, vector)
    # THEN the tile is two channel vectors wide over a part of the fused pixel axis, not one vector
    #      of a whole row (13 pixels x 1 vector: 14 loads per 13 FMAs, load bound), within the registers
    assert vectors == 2
    assert pixels * vectors >= 10
    assert pixels * vectors + vectors + 1 <= vector.registers


@pytest.mark.parametrize(("cin", "cout", "k", "hw"), [(128, 128, 3, 28), (1024, 256, 1, 14), (256, 256, 3, 14),
                                                      (64, 64, 1, 56)])
def test_maps_with_four_pixel_row_tiles_get_fused_tiles_on_avx2(cin: int, cout: int, k: int, hw: int) -> None:
    # GIVEN a convolution over a 14x14, 28x28 or 56x56 map on AVX2, whose best row tile within the
    #       registers is 4 pixels x 2 vectors (no divisor of the row between 4 and 7)
    from kiln import isa

    vector = isa.VectorUnit(8, 16)
    conv = _conv_kernel(cin, cout, k, 1, hw, vector.lanes)
    # WHEN Kiln's default schedule tiles it
    pixels, vectors = _anchor_tile(conv, vector)
    # THEN it keeps more than 8 accumulators (2 FMA pipes x 4 cycles: 4 x 2 ran 4-8% slower than
    #      6 x 2 over the fused pixel axis, ADR 0033), within the registers
    assert vectors == 2
    assert pixels * vectors >= 12
    assert pixels * vectors + vectors + 1 <= vector.registers


FUSED_TARGETS = [(AVX2, (8, 16))] + ([({"kind": "llvm", "mcpu": "skylake-avx512"}, (16, 32))]
                                      if _has_avx512() else [])


@pytest.mark.parametrize(("target", "unit"), FUSED_TARGETS, ids=lambda t: t["mcpu"] if isinstance(t, dict) else "")
@pytest.mark.parametrize(("cin", "cout", "k", "stride", "hw"), [(64, 200, 1, 1, 13), (32, 64, 3, 1, 13),
                                                                (48, 96, 3, 2, 14), (64, 128, 1, 1, 7)])
def test_fused_pixel_tile_with_tail_matches_unscheduled_kernel(cin: int, cout: int, k: int, stride: int, hw: int,
                                                               target: dict[str, Any], unit: tuple[int, int]) -> None:
    # GIVEN a fused conv kernel tiled over its fused H*W axis with a tail tile, on each ISA (AVX-512's
    #       default keeps row tiles for these maps, so the knob forces the fused tile there)
    from kiln import isa
    from kiln_compiler.schedules import TileKnobs, default_schedule

    vector = isa.VectorUnit(*unit)
    conv = _conv_kernel(cin, cout, k, stride, hw, vector.lanes)
    scheduled = default_schedule(conv, vector, TileKnobs(max_vectors=2, max_pixels=6, fused_pixels=True)).mod["main"]
    out_pixels = ((hw + 2 * (k // 2) - k) // stride + 1) ** 2
    text = scheduled.script()
    assert f"T.int64({out_pixels})" in text  # the accumulators are indexed by the fused pixel axis
    assert "T.where(" in text  # and the last tile is a tail (169 and 49 pixels: no divisor up to 6 but 1)
    rng = np.random.default_rng(11)
    args = [rng.standard_normal([int(d) for d in buf.shape]).astype("float32") for buf in conv.params]
    outputs = []
    # WHEN the scheduled and the unscheduled kernel run on the same inputs, the output starting as noise
    for func in (scheduled, conv):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        outputs.append(tensors[-1].numpy())
    # THEN every output pixel, the tail's included, is written once with the reference's value
    #      (a write-back over-approximating its region would copy other tiles' unset accumulators)
    assert not np.allclose(outputs[1], args[-1])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("cout", "want"), [(1000, 1008), (200, 208), (72, 72), (40, 40), (64, 64)])
def test_odd_vector_counts_are_padded_to_pairs(cout: int, want: int) -> None:
    # GIVEN a dense 1x1 convolution with ``cout`` output channels (8-lane vectors: 125, 25, 9, 5, 8)
    from kiln_compiler.graph import cpu_graph_passes

    mod = _conv_block(16, cout, 1, 1, 0, 13, 1, seed=5)
    # WHEN Kiln's graph passes rewrite it for AVX2
    with tvm.target.Target(AVX2):
        rewritten = tvm.transform.Sequential(cpu_graph_passes(8))(mod)
    convs = [int(c) for c in re.findall(r"R.Tensor\(\(1, 13, 13, (\d+)\), dtype=\"float32\"\) = R.nn.conv2d\(",
                                        rewritten["main"].script())]
    # THEN an odd number of vectors from 9 up, not a multiple of 3 (3-vector tiles), gets one more
    #      vector so a 2-vector tile fits; the others keep their width
    assert convs == [want]


@pytest.mark.parametrize(("lanes", "registers"), [(8, 16), (16, 32)], ids=["avx2", "avx512"])
@pytest.mark.parametrize(("cin", "stride", "hw"), [(1024, 1, 14), (512, 2, 28), (2048, 1, 7)])
def test_tile_pixels_sharing_an_l1_set_stay_below_its_ways(lanes: int, registers: int, cin: int, stride: int,
                                                           hw: int) -> None:
    # GIVEN a 1x1 convolution whose neighbouring output pixels read inputs 4 KiB (or 8 KiB) apart
    from kiln import isa
    from kiln_compiler import pipeline as tp
    from kiln_compiler.graph import cpu_graph_passes
    from kiln_compiler.schedules import l1

    mod = _conv_block(cin, 64, 1, stride, 0, hw, 1, seed=6)
    with tvm.target.Target(AVX2):
        fused = tvm.transform.Sequential(tp._fuse_passes())(tvm.transform.Sequential(cpu_graph_passes(lanes))(mod))
    (conv,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint]
    # WHEN Kiln's default schedule tiles it
    pixels, vectors = _anchor_tile(conv, isa.VectorUnit(lanes, registers))
    # THEN at most 7 pixel streams share the 8 ways of an L1 set (14 evicted each other: 89 -> 114 GFLOP/s
    #      at 7 pixels, 1024 channels at 14x14, AVX-512), and the tile still has accumulators to hide latency
    assert pixels <= 7
    assert pixels * vectors >= 7
    # AND the model behind it: 4 KiB apart, 7 of 14 pixels fit; 1 KiB apart (256 channels), all 14 do
    assert (l1.conflict_free_run(14, 4096), l1.conflict_free_run(14, 1024), l1.streams_per_set(2, 7, 28672, 4096)) \
        == (7, 14, 14)


def _dense_chain(layers: int, channels: int, growth: int, hw: int) -> Any:
    """DenseNet's block as ONNX spells it (after a 1x1 stem conv): each layer's batch norm + ReLU + 3x3 conv
    output is concatenated to the previous concat, which the next layer's batch norm reads."""
    rng = np.random.default_rng(7)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, channels, hw, hw), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            stem = relax.const(rng.standard_normal((channels, channels, 1, 1)).astype("float32") / np.sqrt(channels))
            feats, width = bb.emit(relax.op.nn.conv2d(x, stem)), channels
            for _ in range(layers):
                scale = relax.const(rng.uniform(0.5, 1.5, (width, 1, 1)).astype("float32"))
                shift = relax.const(rng.standard_normal((width, 1, 1)).astype("float32"))
                w = relax.const(rng.standard_normal((growth, width, 3, 3)).astype("float32") / np.sqrt(9 * width))
                y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.multiply(feats, scale), shift)))
                y = bb.emit(relax.op.nn.conv2d(y, w, padding=1))
                feats, width = bb.emit(relax.op.concat([feats, y], axis=1)), width + growth
            head = relax.const(rng.standard_normal((channels, width, 1, 1)).astype("float32") / np.sqrt(width))
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(relax.op.nn.relu(feats), head)))  # the transition
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
@pytest.mark.parametrize(("channels", "growth"), [(32, 16), (24, 12)])
def test_dense_block_concats_are_flat_fused_and_match_unscheduled(channels: int, growth: int,
                                                                 target: dict[str, Any]) -> None:
    # GIVEN a DenseNet block of four layers (growth of whole vectors, and of a part of one)
    from kiln_compiler import pipeline as tp
    from kiln_compiler.graph import cpu_graph_passes
    from kiln_compiler.schedules import default_schedule, target_vector_unit

    mod = _dense_chain(4, channels, growth, 8)
    # WHEN Kiln's graph passes, fusion and default schedules run
    with tvm.target.Target(target) as tgt:
        nhwc = tvm.transform.Sequential(cpu_graph_passes(target_vector_unit(tgt).lanes))(mod)
        fused = tvm.transform.Sequential(tp._fuse_passes())(nhwc)
        vector = target_vector_unit(tgt)
    # THEN each layer concatenates the block input and every output so far in one concat
    concats: list[int] = []
    relax.analysis.post_order_visit(nhwc["main"], lambda e: concats.append(len(e.args[0].fields)) if isinstance(
        e, relax.Call) and e.op == tvm.ir.Op.get("relax.concat") and isinstance(e.args[0], relax.Tuple) else None)
    assert sorted(concats) == [2, 3, 4, 5]
    kernels = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    # AND no concat is a copy of its own: each is fused with the batch norm / ReLU that reads it
    assert not [n for n in kernels if n.startswith("concatenate")], sorted(kernels)
    # AND its kernel runs one loop per input (no select per input and output vector)
    partitions = sorted(default_schedule(f, vector).mod["main"].script().count('_partition")')
                        for n, f in kernels.items() if "concatenate" in n)
    assert partitions == [2, 3, 4, 5]
    # AND the block computes what the unscheduled build computes
    xs = np.random.default_rng(8).standard_normal((1, channels, 8, 8)).astype("float32")
    np.testing.assert_allclose(_run(mod, xs, target, True), _run(mod, xs, target, False), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("target", "unit"), FUSED_TARGETS, ids=lambda t: t["mcpu"] if isinstance(t, dict) else "")
@pytest.mark.parametrize(("cin", "cout", "k", "stride", "hw"), [(3, 64, 3, 2, 29), (16, 64, 1, 1, 27)],
                         ids=["stem", "expand-1x1"])
def test_tile_accumulators_live_on_the_stack_not_in_a_workspace(cin: int, cout: int, k: int, stride: int, hw: int,
                                                               target: dict[str, Any], unit: tuple[int, int]) -> None:
    # GIVEN a conv kernel with a short reduction (SqueezeNet's unpadded 3-channel stem, a fire module's
    #       16-channel expand 1x1), tiled by Kiln's default schedule (AVX2: under 1 KiB of accumulators,
    #       AVX-512: over it)
    from kiln import isa
    from kiln_compiler.schedules import default_schedule
    from kiln_compiler.schedules.stack import TIR_PIPELINE

    vector = isa.VectorUnit(*unit)
    conv = _conv_kernel(cin, cout, k, stride, hw, vector.lanes, pad=0)
    scheduled = default_schedule(conv, vector).mod["main"]
    rng = np.random.default_rng(12)
    args = [rng.standard_normal([int(d) for d in buf.shape]).astype("float32") for buf in conv.params]
    outputs, code = [], []
    # WHEN the scheduled and the unscheduled kernel are built with Kiln's TIR pipeline and run on the same inputs
    for func in (scheduled, conv):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target,
                          tir_pipeline=TIR_PIPELINE)
        code.append(lib.mod.inspect_source("ll"))
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        outputs.append(tensors[-1].numpy())
    # THEN the tile's accumulators are a stack buffer (registers after LLVM), not a workspace allocated and
    #      freed per tile (two runtime calls and a memory round trip per tile: the stem ran at 34-39 instead
    #      of 64 GFLOP/s)
    assert "fmuladd" in code[0] or "fma" in code[0]
    assert "TVMBackendAllocWorkspace" not in code[0]
    # AND it computes what the unscheduled kernel computes
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=RTOL, atol=ATOL)
