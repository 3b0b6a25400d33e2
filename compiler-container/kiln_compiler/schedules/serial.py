"""Kernels too small to gain from a second thread keep their loops serial (ADR 0038).

A parallel loop costs a launch of Kiln's launcher (ADR 0032): waking the workers, claiming chunks,
waiting for the chunks a worker took, and the output's cache lines moving between cores. Measured per
call on ShuffleNet (minimum over 40 inferences, Zen 4): kernels whose largest block has up to ~120
thousand iterations (residual add + ReLU at 14x14x544, depthwise 3x3 at 7x7x272, the pools, the
softmax) took 0.88-1.03x their one-thread time at two threads, while elementwise kernels of 213
thousand iterations and up ran 1.27-1.56x faster. On a loaded host each launch is also a chance to
wait for a worker the OS has descheduled. Such kernels run on the calling thread.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.s_tir import Schedule, Trace

from .tir import has_root, iter_extents

# Block iterations (multiply-adds of a reduction, elements of an elementwise block) below which a
# kernel runs serially: ~10-15 us on one Zen 4 core for an elementwise or depthwise kernel.
SERIAL_WORK = 160_000


def kernel_work(func: tirx.PrimFunc) -> int | None:
    """Iterations of the largest block at ``func``'s root (unscheduled): the product of its iterator
    extents (the elementwise blocks of a fused epilogue and a padding copy are inlined into the loops
    of the largest one). None when a block's domain is not static."""
    sch = Schedule(func)
    if not has_root(sch):
        return None
    largest = 0
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        extents = iter_extents(sch.get(blk))
        if extents is None:
            return None
        n = 1
        for e in extents:
            n *= e
        largest = max(largest, n)
    return largest


def without_parallel(sch: Schedule, func: tirx.PrimFunc) -> Schedule:
    """``sch``'s trace replayed on ``func`` (the function ``sch`` started from) without its Parallel
    instructions: the same loop nest, run on the calling thread."""
    trace = sch.trace
    assert trace is not None
    insts = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
    kept = {inst: trace.decisions[inst] for inst in insts if inst in trace.decisions}
    serial = Schedule(func)
    Trace(insts, kept).apply_to_schedule(serial, remove_postproc=False)
    return serial


def serial_if_small(sch: Schedule, func: tirx.PrimFunc, threshold: int = SERIAL_WORK) -> Schedule:
    """``sch`` without parallel loops when ``func`` has fewer than ``threshold`` block iterations."""
    work = kernel_work(func)
    if work is None or work >= threshold or not _has_parallel(sch):
        return sch
    return without_parallel(sch, func)


def _has_parallel(sch: Schedule) -> bool:
    trace = sch.trace
    return trace is not None and any(inst.kind.name == "Parallel" for inst in trace.insts)


def parallel_loops(func: tirx.PrimFunc) -> int:
    """Number of parallel loops in a (scheduled) PrimFunc."""
    count = [0]

    def visit(node: Any) -> None:
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            count[0] += 1

    _walk(func.body, visit)
    return count[0]


def _walk(stmt: Any, visit: Any) -> None:
    # TVM 0.27 has no Python statement visitor: walk the statement kinds a scheduled kernel holds
    visit(stmt)
    for attr in ("body", "block", "then_case", "else_case", "init"):
        child = getattr(stmt, attr, None)
        if isinstance(child, tirx.Stmt):
            _walk(child, visit)
    seq = getattr(stmt, "seq", None)
    if seq is not None:
        for child in seq:
            _walk(child, visit)
