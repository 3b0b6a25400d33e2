"""Concatenations along the innermost (channel) axis, and what is fused after them, one loop per input.

TOPI spells a concat as a chain of selects on the output channel (``c >= 96 ? x2[c - 96] : c >= 64 ?
x1[c - 64] : x0[c]``). Vectorised as it is, every output vector evaluates every branch: one load per
input and a select each, for DenseNet's concats of up to 33 inputs. Partitioned at the inputs'
boundaries (``loop_partition``), each loop covers one input's channels, the simplifier drops the
selects whose condition its range decides, and the loop is a plain vectorised copy of that input
through the fused elementwise epilogue (DenseNet's batch norm + ReLU).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.sym import Analyzer

from .tir import DATA_PAR

# widest input (in vectors) whose loop is vectorised whole; wider ones stay scalar loops (LLVM's to vectorise)
_MAX_VECTORS = 8


def concat_pieces(sch: Schedule, block: Any) -> list[int] | None:
    """Widths of the inputs a block concatenates along its innermost axis, in order; None if it does not.

    Read from the block's read regions: an input read at ``c - offset`` with fewer channels than the
    output is a piece; the pieces must tile the output's channels exactly."""
    b = sch.get(block)
    if not b.iter_vars or any(iv.iter_type != DATA_PAR for iv in b.iter_vars) or len(b.writes) != 1:
        return None
    channel = b.iter_vars[-1].var
    out = b.writes[0].source
    if len(out.shape) != len(b.iter_vars) or not isinstance(out.shape[-1], tirx.IntImm):
        return None
    width = int(out.shape[-1])
    pieces: dict[int, int] = {}
    for read in b.reads:
        dims = read.source.shape
        if len(dims) != len(out.shape) or not isinstance(dims[-1], tirx.IntImm) or int(dims[-1]) >= width:
            continue
        offset = Analyzer().simplify(channel - read.region[-1].min)
        if not isinstance(offset, tirx.IntImm):
            return None
        pieces[int(offset)] = int(dims[-1])
    if len(pieces) < 2:
        return None
    start, widths = 0, []
    for offset in sorted(pieces):
        if offset != start:
            return None
        widths.append(pieces[offset])
        start += pieces[offset]
    return widths if start == width else None


def schedule_concat(sch: Schedule, block: Any, lanes: int) -> bool:
    """Schedule a concat (with its fused epilogue) as one vectorised loop per input; False if ``block``
    is no innermost-axis concat or its loops are not the block's own."""
    widths = concat_pieces(sch, block)
    loops = sch.get_loops(block)
    if widths is None or len(loops) != len(sch.get(block).iter_vars):
        return False
    lead = list(loops[:-1])
    if lead:
        fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        if int(sch.get(fused).extent) > 1:
            sch.parallel(fused)
    # each partition's loop starts at its input's offset, which TVM does not split: it is vectorised
    # whole (LLVM splits a wide vector of a copy and its epilogue into registers)
    parts = sch.loop_partition(loops[-1], [*widths[:-1], None])
    for i, (part, width) in enumerate(zip(parts, widths, strict=True)):
        vec = next((lanes * n for n in (4, 2, 1) if width % (lanes * n) == 0), 0)
        if i == 0 and vec and vec < width:  # the first input's loop starts at 0: whole vectors
            part = sch.split(part, [None, vec])[1]
        elif width > _MAX_VECTORS * lanes:
            continue
        sch.vectorize(part)
    return True
