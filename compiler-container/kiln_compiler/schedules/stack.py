"""Register tiles' accumulator buffers on the stack: the TIR pipeline Kiln builds CPU kernels with.

A conv/matmul tile accumulates into a small buffer (``cache_write``, pixels x channels of the tile) that
lives inside the parallel loop, one per tile. TVM's ``LowerTVMBuiltin`` turns every allocation that is not
``global`` scope or not under 1 KiB (``kMaxStackAlloca``) into a ``TVMBackendAllocWorkspace`` /
``TVMBackendFreeWorkspace`` pair, so each tile paid two runtime calls and a round trip of its
accumulators through memory: SqueezeNet's 3-channel stem (27 reduction steps per tile) ran at 34-39
instead of 64 GFLOP/s (ADR 0057). The tiles' buffers are ``global`` (schedules/cpu.py), which keeps the
ones under 1 KiB (AVX2 tiles) on the stack; ``StackTileBuffers`` marks the larger ones inside a parallel
loop, up to ``MAX_STACK_BYTES`` (AVX-512 tiles of up to 29 zmm are 1.9 KiB), so ``LowerTVMBuiltin`` leaves
them to LLVM as allocas, which it promotes to registers.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx
from tvm.tirx import stmt as tstmt
from tvm.tirx.compilation_pipeline import register_tir_pipeline

# Largest buffer inside a parallel loop kept on the stack: a register tile's accumulators (32 zmm = 2 KiB)
# with room to spare, far below a worker thread's stack.
MAX_STACK_BYTES = 4096
# The TIR pipeline name ``tvm.compile(..., tir_pipeline=TIR_PIPELINE)`` builds with (TVM's default plus this pass).
TIR_PIPELINE = "kiln"
_DISABLE_LOWER_BUILTIN = "disable_lower_builtin"  # LowerTVMBuiltin leaves an allocation so marked as it is


def _constant_bytes(buf: Any) -> int | None:
    dtype = tvm.DataType(buf.dtype)
    size = max(1, dtype.bits // 8) * max(1, dtype.lanes)
    for dim in buf.shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        size *= int(dim)
    return size


def _mark(stmt: Any, in_parallel: bool) -> Any:
    """``stmt`` with every small global buffer allocated inside a parallel loop marked for the stack."""
    if isinstance(stmt, tstmt.SeqStmt):
        seq = [_mark(s, in_parallel) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq, strict=True)) else tstmt.SeqStmt(seq, stmt.span)
    if isinstance(stmt, tstmt.For):
        body = _mark(stmt.body, in_parallel or stmt.kind == tirx.ForKind.PARALLEL)
        return stmt if body.same_as(stmt.body) else tstmt.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations, stmt.step,
            stmt.span)
    if isinstance(stmt, tstmt.AttrStmt):
        body = _mark(stmt.body, in_parallel)
        return stmt if body.same_as(stmt.body) else tstmt.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body, stmt.span)
    if isinstance(stmt, tstmt.IfThenElse):
        then = _mark(stmt.then_case, in_parallel)
        other = None if stmt.else_case is None else _mark(stmt.else_case, in_parallel)
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tstmt.IfThenElse(stmt.condition, then, other, stmt.span)
    if isinstance(stmt, tstmt.While):
        body = _mark(stmt.body, in_parallel)
        return stmt if body.same_as(stmt.body) else tstmt.While(stmt.condition, body, stmt.span)
    if isinstance(stmt, tstmt.AllocBuffer) and in_parallel and _DISABLE_LOWER_BUILTIN not in stmt.annotations:
        buf = stmt.buffer
        size = _constant_bytes(buf)
        if buf.scope() == "global" and size is not None and size <= MAX_STACK_BYTES:
            return tstmt.AllocBuffer(buf, {**dict(stmt.annotations), _DISABLE_LOWER_BUILTIN: tirx.IntImm("bool", 1)},
                                     stmt.span)
    return stmt


@tirx.transform.prim_func_pass(opt_level=0, name="KilnStackTileBuffers")
def StackTileBuffers(func: tirx.PrimFunc, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
    """Mark the small buffers allocated inside parallel loops (register tiles' accumulators) for the stack."""
    body = _mark(func.body, False)
    return func if body.same_as(func.body) else func.with_body(body)


def _kiln_tir_pipeline() -> tuple[Any, Any, Any]:
    from tvm.s_tir.pipeline import default_s_tir_pipeline, finalize_host_passes

    lower, _, finalize_device = default_s_tir_pipeline()

    def finalize_host() -> tvm.transform.Pass:
        return tvm.transform.Sequential([StackTileBuffers, finalize_host_passes()])

    return lower, finalize_host, finalize_device


register_tir_pipeline(TIR_PIPELINE, _kiln_tir_pipeline)
