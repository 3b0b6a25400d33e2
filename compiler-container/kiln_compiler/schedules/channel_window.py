"""A channel-window kernel (LRN as ``ChannelWindowToSlices`` writes it) with its padded input computed per pixel.

The sum of ``k`` shifted slices of a channel-padded tensor, inlined like any elementwise chain, reads the pad through a
bounds check per slice and vector (``if_then_else(2 <= c + i < C + 2, x[c + i - 2] ** 2, 0)``), five masked reads per
output vector. Computed per pixel into a row of ``C + k - 1`` channels (L1-resident), the slices are plain loads at
offsets: Inception-v1's two LRN kernels alone 0.53 -> 0.32 ms and 0.18 -> 0.14 ms (1 thread, ADR 0053). The sum then
rounds differently from the inlined one (an ulp), so only kernels that write bf16 (bf16 builds, whose result is
rounded to 8 bits anyway) take this schedule: fp32 builds are unchanged.
"""

from __future__ import annotations

from typing import Any

from tvm.s_tir import Schedule

from .tir import is_at_root, writes_output


def _channel_pad(sch: Schedule, blk: Any) -> bool:
    """Whether ``blk`` pads only the innermost (channel) axis of the tensor it reads."""
    b = sch.get(blk)
    if len(b.reads) != 1 or len(b.writes) != 1:
        return False
    src, dst = b.reads[0].source.shape, b.writes[0].source.shape
    return (len(src) == len(dst) >= 2 and all(int(s) == int(d) for s, d in zip(src[:-1], dst[:-1], strict=True))
            and int(dst[-1]) > int(src[-1]))


def schedule_channel_window(sch: Schedule, root: Any, lanes: int) -> Schedule | None:
    """A copy of ``sch`` scheduled as above, or None when the kernel is no bf16 channel window (``sch`` untouched)."""
    blocks = sch.get_child_blocks(root)
    outputs = [b for b in blocks if writes_output(sch, b)]
    if len(outputs) != 1 or str(sch.get(outputs[0]).writes[0].source.dtype) != "bfloat16":
        return None
    pads = [b for b in blocks if sch.get(b).name_hint.startswith("PadInput") and _channel_pad(sch, b)]
    if len(pads) != 1:
        return None
    new = sch.copy()
    pad = new.get_sblock(sch.get(pads[0]).name_hint)
    final = new.get_sblock(sch.get(outputs[0]).name_hint)
    changed = True
    while changed:  # everything but the pad and the output inlined (the square into the pad, the rest into the output)
        changed = False
        for blk in new.get_child_blocks(new.get_sblock("root")):
            if new.get(blk).same_as(new.get(pad)) or new.get(blk).same_as(new.get(final)) or not is_at_root(new, blk):
                continue
            try:
                new.compute_inline(blk)
                changed = True
                break
            except Exception:
                continue
    if len(new.get_child_blocks(new.get_sblock("root"))) != 2:
        return None
    loops = new.get_loops(final)
    channels = int(new.get(loops[-1]).extent)
    if len(loops) < 2 or channels % lanes:
        return None
    outer = new.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    inner = new.split(loops[-1], [None, lanes])[1]
    new.parallel(outer)
    new.vectorize(inner)
    new.compute_at(pad, outer)
    return new
