"""ShuffleNet fp32 kernels of ADR 0054: batch norms folded into the grouped 1x1 and depthwise weights, the
padded channels of a grouped matmul sliced in its tiles on AVX-512, the 24-channel stem in half vectors.

The numerical checks of these paths against the unscheduled build (rtol/atol 1e-4, AVX2 and AVX-512) are the
existing ones, which now run them: test_shuffle_fold.py's residual units (batch norms after every conv,
34 / 68 / 28 channels per group), test_cpu_kernels.py's `channels_24` conv and real ShuffleNet, and
test_stem_kernels.py's ShuffleNet stem. Here: that the paths are taken, and where they are not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from kiln import isa  # noqa: E402
from kiln_compiler import pipeline  # noqa: E402
from kiln_compiler.schedules import default_schedule  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from tests.compiler.conftest import shuffle_unit  # noqa: E402
from tests.compiler.test_cpu_kernels import AVX2, _conv_block  # noqa: E402

AVX512_UNIT, AVX2_UNIT = isa.VectorUnit(16, 32), isa.VectorUnit(8, 16)


def _fused(mod: Any, target: dict[str, Any] = AVX2, precision: str = "fp32") -> dict[str, Any]:
    """The fused kernels (name -> PrimFunc) the CPU pipeline makes of ``mod``."""
    with tvm.target.Target(target) as tgt:
        fused = pipeline._cpu_kernels(mod, tgt, True, precision)
    return {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _batch_normed_group_matmul(subtract_from_constant: bool) -> Any:
    """A 4-group 1x1 conv (4 x 34 channels) and a batch norm as inference decomposes it: (y - mean) * scale *
    gamma + beta; with ``subtract_from_constant`` the first op is mean - y instead."""
    rng = np.random.default_rng(5)

    def const(*shape: int) -> Any:
        return relax.const(rng.standard_normal(shape).astype("float32"))

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 136, 14, 14), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(136, 34, 1, 1), groups=4))
            mean = const(1, 136, 1, 1)
            y = bb.emit(relax.op.subtract(mean, y) if subtract_from_constant else relax.op.subtract(y, mean))
            y = bb.emit(relax.op.add(relax.op.multiply(relax.op.multiply(y, const(1, 136, 1, 1)),
                                                       const(1, 136, 1, 1)), const(1, 136, 1, 1)))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


def test_batch_norms_fold_into_the_grouped_and_depthwise_weights() -> None:
    # GIVEN a ShuffleNet unit with a scale and shift after each of its three convolutions
    # WHEN fused for an fp32 compile
    names = [n for n in _fused(shuffle_unit(136, 4, 14, residual=True)) if "matmul" in n or "conv2d" in n]
    # THEN each scale is in its convolution's weights: the kernels keep one add (the shift; the residual)
    assert len(names) == 3, names
    assert not any("multiply" in n for n in names), names
    # AND a batch norm as inference decomposes it (subtract, two multiplies, add) leaves one add too
    (matmul,) = [n for n in _fused(_batch_normed_group_matmul(False)) if "matmul" in n]
    assert "subtract" not in matmul and "multiply" not in matmul and matmul.count("_add") == 1, matmul


def test_a_shift_subtracting_the_output_is_not_folded() -> None:
    # GIVEN mean - y after the grouped conv (the sign of y flips: not a scale and shift of y's weights as built)
    # WHEN fused  THEN the chain is computed as written: its subtract and multiplies are left in an epilogue
    names = list(_fused(_batch_normed_group_matmul(True)))
    assert any("subtract" in n and "multiply" in n for n in names), names


def test_bf16_compile_keeps_the_batch_norms_in_fp32() -> None:
    # GIVEN a ShuffleNet unit  WHEN fused for a bf16 compile (ConvToBF16, ADR 0049: no folded batch norms)
    names = _fused(shuffle_unit(136, 4, 14, residual=True), {"kind": "llvm", "mcpu": "znver4"}, "bf16")
    # THEN its scales stay multiplies after the products (the depthwise conv's in its kernel)
    assert any(n.startswith("fused_conv2d") and "multiply" in n for n in names), sorted(names)


def _root_loop_nests(func: Any) -> int:
    """How many loop nests the scheduled kernel runs one after the other (each a pass over its domain)."""
    body = func.body.block.body
    return len(body.seq) if isinstance(body, tvm.tirx.SeqStmt) else 1


def test_grouped_matmul_slices_its_padded_channels_in_the_tile_on_avx512_only() -> None:
    # GIVEN the first grouped matmul of a unit with 34 channels per group (48 on AVX-512, 40 on AVX2)
    unit = shuffle_unit(136, 4, 14, residual=True)
    (avx512,) = [f for n, f in _fused(unit, {"kind": "llvm", "mcpu": "skylake-avx512"}).items()
                 if n.startswith("fused_matmul")]
    (avx2,) = [f for n, f in _fused(unit).items() if n.startswith("fused_matmul")]
    # WHEN scheduled for each vector unit
    on_avx512 = default_schedule(avx512, AVX512_UNIT).mod["main"]
    on_avx2 = default_schedule(avx2, AVX2_UNIT).mod["main"]
    # THEN on AVX-512 the tile's loop nest is the whole kernel: its slice of the valid channels is in the tile
    assert _root_loop_nests(on_avx512) == 1, on_avx512.script()
    # AND on AVX2 (measured slower in the tile) the padded result is sliced by a pass of its own
    assert _root_loop_nests(on_avx2) == 2, on_avx2.script()


def test_24_channel_conv_on_avx512_is_tiled_in_three_half_vectors() -> None:
    # GIVEN ShuffleNet's stem shape: 3x3 stride 2, 3 -> 24 channels (one and a half 16-lane vectors)
    mod = _conv_block(3, 24, 3, 2, 1, 56, 1, seed=1)
    (conv,) = [f for n, f in _fused(mod, {"kind": "llvm", "mcpu": "skylake-avx512"}).items() if "conv2d" in n]
    # WHEN Kiln's default schedule tiles it for AVX-512
    sch = default_schedule(conv, AVX512_UNIT)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))]
    vectorized = [int(lp.extent) for lp in loops if lp.kind == tvm.tirx.ForKind.VECTORIZED]
    unrolled = [int(lp.extent) for lp in loops if lp.kind == tvm.tirx.ForKind.UNROLLED]
    # THEN each input broadcast feeds all 24 channels as three 8-lane vectors (not one per channel tile), and
    #      the pixels x 3 accumulators, 3 weight vectors and the broadcast fit AVX-512's 32 registers
    assert vectorized == [8] and 3 in unrolled, (vectorized, unrolled)
    pixels = int(np.prod(unrolled)) // 3
    assert pixels >= 4 and pixels * 3 + 3 + 1 <= 32, unrolled
