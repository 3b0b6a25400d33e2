"""The model input's NCHW -> NHWC transpose (with an int8 graph's quantize), vectorised along the image rows.

An int8 graph's first kernel quantizes the fp32 NCHW input to u8 and transposes it to NHWC, its 3 colour
channels padded to 4 for the ``vpdpbusd`` stem (ADR 0035). Kiln's default elementwise schedule vectorises
the output's fused (w, c) axis: every lane reads another channel plane, a gather, and the bounds checks of
the padding run per byte (SqueezeNet, 224 x 226 x 4: 0.16 ms, 1 thread; ONNX Runtime's QuantizeLinear +
Transpose 0.11 ms). Here the loop nest is (h, w / 16, c, w % 16): each channel's 16 inputs are one
contiguous vector load and their quantization one vector pass; only the byte stores are interleaved.
fp32 graphs whose stem keeps the transpose (the 7x7 stems, ADR 0045) get the same nest for it: the default
schedule's 32-lane gather ran the 224 x 224 x 3 transpose in 97 us, the interleaved loads and stores in 14 us
(1 thread, AVX-512 and AVX2 alike; ADR 0055).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from .stem import is_nchw_to_nhwc
from .tir import DATA_PAR, has_root, schedule_each, writes_output

_MAX_CHANNELS = 4  # the stem's padded colour channels: the interleave stays a few stores per vector
_ROW_VECTOR = 16  # inputs per channel per step (measured best of 8 / 16 / 32 / 64 on SqueezeNet's input)
_EIGHT_BIT = ("uint8", "int8")


def schedule_input_interleave(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The row-vectorised schedule of an elementwise kernel writing an 8-bit NHWC tensor of at most 4 channels
    from channel-first inputs (an int8 graph's input quantize + transpose), or of a plain fp32 NCHW -> NHWC
    transpose of at most 4 channels (an fp32 graph's input), or None when ``func`` is no such kernel."""
    if is_nchw_to_nhwc(func):
        return _interleave(func) if _channels(func.params[1]) <= _MAX_CHANNELS else None
    sch = Schedule(func)
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks or not writes_output(sch, blocks[-1]):
        return None
    out = blocks[-1]
    buf = sch.get(out).writes[0].source
    if str(buf.dtype) not in _EIGHT_BIT or len(buf.shape) != 4 or not isinstance(buf.shape[3], tirx.IntImm) \
            or int(buf.shape[3]) > _MAX_CHANNELS:
        return None
    for blk in blocks[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # not elementwise: some other kernel
            return None
    b = sch.get(out)
    if len(b.iter_vars) != 4 or any(iv.iter_type != DATA_PAR for iv in b.iter_vars) or len(sch.get_loops(out)) != 4:
        return None
    row, channel = b.iter_vars[2].var, b.iter_vars[3].var
    # channel-first reads: the input's innermost index follows the output's columns, not its channels
    for read in b.reads:
        if len(read.region) < 2:
            return None
        innermost = set(tirx.analysis.undefined_vars(read.region[-1].min, []))
        if channel in innermost or row not in innermost:
            return None
    return _interleave(func)


def _channels(buf: tirx.Buffer) -> int:
    return int(buf.shape[3]) if isinstance(buf.shape[3], tirx.IntImm) else _MAX_CHANNELS + 1


def _interleave(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func``'s blocks inlined into its output block, looped (n * h parallel, w / 16, c unrolled, w % 16 vectorised)."""
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for blk in blocks[:-1]:
        sch.compute_inline(blk)
    out = blocks[-1]
    n, h, w, c = sch.get_loops(out)
    wo, wi = sch.split(w, [None, _ROW_VECTOR])
    sch.reorder(n, h, wo, c, wi)
    sch.parallel(sch.fuse(n, h))
    sch.unroll(c)
    sch.vectorize(wi)
    result: tirx.PrimFunc = sch.mod["main"]
    return result


@tvm.transform.module_pass(opt_level=0, name="KilnInputInterleaveSchedule")
class InputInterleaveSchedule:
    """Schedule the model input's NCHW -> NHWC kernel (an int8 graph's with its quantize) along the image rows."""

    def __init__(self) -> None:
        self.scheduled: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_each(mod, schedule_input_interleave, self.scheduled, "input interleave")
