"""TensorIR queries the schedules and the tuner share (no scheduling decisions here)."""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def same_block(sch: Schedule, a: Any, b: Any) -> bool:
    """Whether two BlockRVs refer to the same block now (BlockRVs themselves compare by handle)."""
    return bool(sch.get(a).same_as(sch.get(b)))


def match_nhwc_conv(func: tirx.PrimFunc, dtypes: tuple[str, str, str]) -> tuple[Schedule, Any, list[int]] | None:
    """A schedule of ``func``, its one reduction block and that block's extents ``[n, h, w, oc, kh, kw, ic]``
    when ``func`` is a fused NHWC convolution reading (data, weight) and writing the accumulator in
    ``dtypes``; None otherwise. Indices are narrowed to int32 first (dot-product intrinsics' descriptions
    index with int32; Relax legalizes with int64 shapes)."""
    matched = match_reduction(func, [DATA_PAR] * 4 + [COMM_REDUCE] * 3, dtypes)
    if matched is None or len(matched[0].get(matched[1]).reads[1].source.shape) != 4:
        return None
    return matched


def match_group_matmul(func: tirx.PrimFunc, dtypes: tuple[str, str, str]) -> tuple[Schedule, Any, list[int]] | None:
    """(schedule, block, extents ``[pixels, groups, 1, out, in]``) of a grouped pointwise convolution as
    ``SplitGroupedConv`` writes it, ``(pixels, groups, 1, in) x (groups, in, out)``, in ``dtypes``; else None."""
    matched = match_reduction(func, [DATA_PAR] * 4 + [COMM_REDUCE], dtypes)
    if matched is None:
        return None
    sch, block, extents = matched
    stmt = sch.get(block)
    if extents[2] != 1 or len(stmt.reads[0].source.shape) != 4 or len(stmt.reads[1].source.shape) != 3:
        return None
    return sch, block, extents


def match_reduction(func: tirx.PrimFunc, kinds: list[Any],
                    dtypes: tuple[str, str, str]) -> tuple[Schedule, Any, list[int]] | None:
    """A schedule of ``func`` (indices narrowed to int32), its one reduction block and that block's
    extents when the block's iterators are of ``kinds`` and it reads two buffers and writes one of
    ``dtypes`` (first read, second read, write); None otherwise."""
    func = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
    sch = Schedule(func)
    if not has_root(sch):
        return None
    reductions = reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if len(reductions) != 1:
        return None
    block = reductions[0]
    stmt = sch.get(block)
    extents = iter_extents(stmt)
    if extents is None or [iv.iter_type for iv in stmt.iter_vars] != kinds or len(stmt.reads) != 2:
        return None
    data, weight = stmt.reads[0].source, stmt.reads[1].source
    if (str(data.dtype), str(weight.dtype), str(stmt.writes[0].source.dtype)) != dtypes:
        return None
    return sch, block, extents


def parallelize_anchor_inputs(sch: Schedule, anchor: Any) -> None:
    """Run the root blocks that feed ``anchor`` (a materialised padded input) in parallel."""
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if not same_block(sch, blk, anchor) and not writes_output(sch, blk) and \
                any(same_block(sch, c, anchor) for c in sch.get_consumers(blk)):
            loops = sch.get_loops(blk)
            sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])


def parallelize_serial_root_blocks(sch: Schedule) -> None:
    """Run the outer loop of every root block that is still all serial in parallel (what was left at
    the root: elementwise consumers that could not be inlined)."""
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        if loops and all(sch.get(lp).kind == tirx.ForKind.SERIAL for lp in loops):
            sch.parallel(loops[0])


def inline_epilogues(sch: Schedule, block: Any, write_back: Any,
                     keep: Callable[[Schedule, Any], bool] | None = None) -> Any | None:
    """Inline the elementwise consumers of ``block`` (bias, batch norm, residual add, relu) into its
    write-back block, up to the first consumer over another domain: TVM would inline a smaller one
    (the slice that drops padded channels) over the tile's whole domain, writing past its buffer.
    A consumer ``keep`` accepts stops the inlining and is returned (None otherwise)."""
    out_shape = [int(d) for d in sch.get(block).writes[0].source.shape]
    while True:
        consumers = sch.get_consumers(write_back)
        if len(consumers) != 1 or iter_extents(sch.get(consumers[0])) != out_shape:
            return None
        if keep is not None and keep(sch, consumers[0]):
            return consumers[0]
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:
            return None


def slice_at_tile(sch: Schedule, write_back: Any, tile: Any) -> list[Any] | None:
    """Compute the slice after a tile's write-back (it drops padded channels) and the elementwise steps after
    it per tile, at ``tile``, its innermost loop vectorised, instead of a pass of its own over the padded
    result: the slice's loops under ``tile``, or None where it stays a pass of its own."""
    consumers = sch.get_consumers(write_back)
    if len(consumers) != 1:
        return None
    inline_epilogues(sch, consumers[0], consumers[0])  # what follows the slice (residual add, relu, a cast)
    try:
        sch.reverse_compute_at(consumers[0], tile)
    except Exception:  # the region does not map onto the tile
        return None
    loops: list[Any] = sch.get_loops(consumers[0])[1:]
    if loops:
        sch.vectorize(loops[-1])
    return loops


def schedule_each(mod: tvm.IRModule, schedule: Callable[[tirx.PrimFunc], tirx.PrimFunc | None],
                  scheduled: list[str], what: str) -> tvm.IRModule:
    """Replace every unscheduled kernel of ``mod`` that ``schedule`` takes by its scheduled form (marked
    scheduled, its name appended to ``scheduled``); a kernel it refuses or fails on keeps its own."""
    updates: dict[Any, tirx.PrimFunc] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        try:
            new = schedule(func)
        except Exception as exc:  # a kernel the blocking does not fit keeps the default schedule
            logging.getLogger(__name__).debug("%s schedule failed for %s: %s", what, gv.name_hint, exc)
            continue
        if new is not None:
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
            scheduled.append(gv.name_hint)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
