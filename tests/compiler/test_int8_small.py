"""SqueezeNet / ShuffleNet int8 kernel paths (ADR 0048): output channels padded to the VNNI tile, the epilogue
after a slice computed per tile, and the model input's quantize + transpose vectorised along its rows.

Outputs of the compiled models against ONNX Runtime on the same QDQ models (within 1 quantized unit, as
tests/compiler/test_int8.py states why) are checked there: ``test_grouped_pointwise_convs_...`` compiles the
24-channel stem below, ``test_data_movement_cnn_matches_onnxruntime`` the 23-column stem and the input
kernel, for a VNNI target and an AVX2 one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import tvm
from kiln_compiler.graph import QuantizedConvToInteger
from kiln_compiler.pipeline import _cpu_kernels
from kiln_compiler.schedules.int8 import VNNIConvSchedule
from kiln_compiler.schedules.interleave import InputInterleaveSchedule
from tvm import tirx
from tvm.relax.frontend.onnx import from_onnx
from tvm.s_tir import Schedule

from tests.compiler.conftest import small_cnn
from tests.compiler.test_int8 import _calls

ZNVER4 = {"kind": "llvm", "mcpu": "znver4"}


def _relax(model: onnx.ModelProto, shape: tuple[int, ...]) -> Any:
    return from_onnx(model, shape_dict={"input": list(shape)}, keep_params_in_input=False)


def _qdq(model_dir: Path, shape: tuple[int, ...]) -> Any:
    return _relax(onnx.load(str(model_dir / "model.onnx")), shape)


def _kernels(mod: Any, target: dict[str, str]) -> Any:
    with tvm.target.Target(target) as tgt:
        return _cpu_kernels(mod, tgt, True)


def _output_under_tile_loop(func: tirx.PrimFunc) -> bool:
    """Whether the block writing ``func``'s output runs inside the loop of the convolution's register tiles
    (not as a pass of its own over the whole s32 result)."""
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    params = func.params
    out = next(b for b in blocks if any(w.source.same_as(p) for w in sch.get(b).writes for p in params))
    tile = next(b for b in blocks if "update" in sch.get(b).name_hint)
    return sch.get(sch.get_loops(out)[0]).same_as(sch.get(sch.get_loops(tile)[0]))


def test_stem_with_24_channels_runs_vnni_on_32_and_slices_in_the_tile(qdq_grouped_pointwise_dir: Path) -> None:
    # GIVEN ShuffleNet's stem, small: a QDQ 3x3 conv with 3 input and 24 output channels
    mod = _qdq(qdq_grouped_pointwise_dir, (1, 3, 16, 16))
    # WHEN the integer rewrite runs
    rewritten = QuantizedConvToInteger()(mod)
    # THEN it is a u8 x s8 conv over 4 input and 32 output channels (the added weights 0), its u8 result sliced
    # back to the 24 channels
    stem = next(c for c in _calls(rewritten) if c.op.name == "relax.nn.conv2d" and int(c.attrs.groups) == 1)
    assert str(stem.args[0].ty.dtype) == "uint8" and [int(d) for d in stem.args[1].ty.shape][:2] == [32, 4]
    slices = [c for c in _calls(rewritten) if c.op.name == "relax.strided_slice"]
    assert [int(d) for d in slices[0].ty.shape] == [1, 24, 16, 16] and str(slices[0].ty.dtype) == "uint8"
    # and the VNNI schedule takes it, the requantizing epilogue after the slice inside the tile loop
    vnni = VNNIConvSchedule()
    scheduled = vnni(_kernels(mod, ZNVER4))
    convs = [name for name in vnni.scheduled if "conv2d" in name]
    assert len(convs) == 1, vnni.scheduled
    assert _output_under_tile_loop(scheduled[convs[0]])


def test_wider_stem_epilogue_runs_in_the_tile(qdq_data_movement_dir: Path) -> None:
    # GIVEN the data-movement CNN, whose 23-column stem is computed 24 wide and sliced back (ADR 0035)
    mod = _qdq(qdq_data_movement_dir, (1, 3, 46, 46))
    # WHEN its kernels get the VNNI schedule
    vnni = VNNIConvSchedule()
    scheduled = vnni(_kernels(mod, ZNVER4))
    # THEN the stem's epilogue after the slice runs per tile, not as a separate pass over the s32 output
    stems = [name for name in vnni.scheduled if "strided_slice" in name and "conv2d" in name]
    assert len(stems) == 1, vnni.scheduled
    assert _output_under_tile_loop(scheduled[stems[0]])


def test_input_quantize_and_transpose_is_vectorised_along_rows(qdq_data_movement_dir: Path) -> None:
    # GIVEN the QDQ data-movement CNN's kernels for a VNNI target
    kernels = _kernels(_qdq(qdq_data_movement_dir, (1, 3, 46, 46)), ZNVER4)
    # WHEN the input interleave schedule runs
    interleave = InputInterleaveSchedule()
    scheduled = interleave(kernels)
    # THEN it takes exactly the input's quantize + NCHW -> NHWC kernel (u8, channels padded to 4 for the stem)
    assert len(interleave.scheduled) == 1 and "transpose" in interleave.scheduled[0], interleave.scheduled
    func = scheduled[interleave.scheduled[0]]
    # with 16 columns per vector, the channels unrolled around it
    script = func.script()
    assert "T.vectorized(T.int64(16))" in script and "T.unroll(T.int64(4))" in script, script


@pytest.mark.parametrize("model", ["fp32", "qdq_avx512"])
def test_float_input_transposes_keep_the_default_schedule(qdq_data_movement_dir: Path, model: str) -> None:
    # GIVEN an fp32 CNN, and the QDQ CNN for AVX-512 without VNNI (no integer kernels: its input kernel writes
    # the integer values as fp32, ADR 0021, 0059); both input transposes write fp32
    kernels = _kernels(_relax(small_cnn(), (1, 3, 32, 32)), ZNVER4) if model == "fp32" else \
        _kernels(_qdq(qdq_data_movement_dir, (1, 3, 46, 46)), {"kind": "llvm", "mcpu": "skylake-avx512"})
    # WHEN the input interleave schedule runs
    interleave = InputInterleaveSchedule()
    interleave(kernels)
    # THEN it takes nothing: of the fp32 kernels only a plain NCHW -> NHWC transpose is interleaved (ADR 0055;
    #      the fp32 CNN's stem reads NCHW, ADR 0045, the AVX-512 QDQ input kernel also quantizes)
    assert interleave.scheduled == []
