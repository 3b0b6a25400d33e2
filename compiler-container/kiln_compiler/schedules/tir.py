"""TensorIR queries the schedules and the tuner share (no scheduling decisions here)."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

DATA_PAR = 0  # IterVar.DataPar
COMM_REDUCE = 2  # IterVar.CommReduce


def iter_extents(block: Any) -> list[int] | None:
    out = []
    for iv in block.iter_vars:
        ext = iv.dom.extent
        if not isinstance(ext, tirx.IntImm):
            return None
        out.append(int(ext))
    return out


def vars_in(regions: Any) -> set[Any]:
    """Variables used by the index expressions of buffer regions."""
    found: set[Any] = set()
    for region in regions:
        for r in region.region:
            found.update(tirx.analysis.undefined_vars(r.min, []))
    return found


def loop_extent(sch: Schedule, loops: list[Any]) -> int:
    n = 1
    for lp in loops:
        n *= int(sch.get(lp).extent)
    return n


def writes_output(sch: Schedule, blk: Any) -> bool:
    params = sch.mod["main"].params  # TVM 0.27: PrimFunc parameters are the buffers
    return any(any(w.source.same_as(p) for p in params) for w in sch.get(blk).writes)


def buffer_bytes(buf: Any) -> int:
    n = 1
    for d in buf.shape:
        n *= int(d) if isinstance(d, tirx.IntImm) else 1 << 20
    return n * max(1, tvm.DataType(buf.dtype).bits // 8)


def has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:
        return False
    return True


def is_at_root(sch: Schedule, blk: Any) -> bool:
    loops = sch.get_loops(blk)
    if not loops:
        return True
    return not any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops)


def reduction_blocks(sch: Schedule, blocks: list[Any]) -> list[Any]:
    """The blocks among ``blocks`` that reduce (conv2d, matmul, pooling)."""
    return [blk for blk in blocks if any(iv.iter_type == COMM_REDUCE for iv in sch.get(blk).iter_vars)]


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """Whether a kernel already carries a schedule (from tuning records or a default schedule)."""
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"])
