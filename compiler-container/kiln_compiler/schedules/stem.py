"""The first convolution of a CNN reads the graph's NCHW input where it lies (no transpose kernel).

ConvertLayout (kiln_compiler.graph) carries convolutions in NHWC, so the image, NCHW at the graph's
edge, is transposed first: a kernel of its own that gathers 3-channel pixels (224 x 224 x 3: 0.10-0.15 ms
at one thread, more than the stem's max pool). A convolution over so few input channels reads each
input value as one broadcast per reduction step whatever the layout, so its kernel can index the NCHW
buffer directly: ``StemReadsNCHW`` rewrites such kernels (after fusion, before the schedules) to take
the NCHW tensor, and the transpose disappears with its last use (ADR 0045). A padded stem keeps its
NHWC padded copy, now gathered from the NCHW image (one pass over it instead of two), where that
measured faster (3x3 windows, ``MAX_PADDED_TAPS``). Read through bounds checks instead, a 7x7 stem ran
2x slower; a padded copy in NCHW (rows of 226 or 230, no whole vectors) cost more than it saved.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir import Schedule

from .tir import COMM_REDUCE, DATA_PAR, has_root, iter_extents, reduction_blocks

# Input channels up to which a convolution reads its input as NCHW: RGB(A) and grey images.
STEM_CHANNELS = 4
# Window taps up to which a padded stem's copy gathers from NCHW. The 7x7 stems (ResNet-50, DenseNet-121,
# Inception-v1) ran 0.1-0.2 ms slower so (their 230 x 230 x 3 copy vectorises as 46 lanes, each dividing
# its index by 3, where the transpose used 32 lanes and the NHWC copy plain loads); the 3x3 one
# (ShuffleNet) 0.1 ms faster, both ISAs, 1 thread.
MAX_PADDED_TAPS = 9
_TO_NCHW = tirx.IndexMap.from_func(lambda n, h, w, c: (n, c, h, w), ndim=4)


def is_nchw_to_nhwc(func: Any) -> bool:
    """Whether ``func`` is a plain 4-D transpose ``out[n, h, w, c] = in[n, c, h, w]`` (float32)."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 2:
        return False
    sch = Schedule(func)
    if not has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1:
        return False
    block = sch.get(blocks[0])
    store = block.body
    if type(store).__name__ != "BufferStore" or type(store.value).__name__ not in ("BufferLoad", "TensorLoad"):
        return False
    load, ivs = store.value, [iv.var for iv in block.iter_vars]
    if len(ivs) != 4 or str(load.source.dtype) != "float32" or len(load.indices) != 4:
        return False
    want_in, want_out = [ivs[0], ivs[3], ivs[1], ivs[2]], ivs
    return all(a.same_as(b) for a, b in zip(load.indices, want_in, strict=True)) and \
        all(a.same_as(b) for a, b in zip(store.indices, want_out, strict=True))


def _reads(block: Any, buf: Any) -> bool:
    return any(r.source.same_as(buf) for r in block.reads)


def nchw_stem(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` (a fused NHWC convolution over at most ``STEM_CHANNELS`` input channels, its data the first
    parameter) rewritten to read that parameter as NCHW; None when ``func`` is not such a kernel.

    The data is read by the convolution itself or by a copy that only the convolution reads: a zero-width
    pad (a plain copy the default schedule inlines into the tile) or, for up to ``MAX_PADDED_TAPS`` window
    taps, a padded copy (it then gathers from NCHW and stays NHWC).
    """
    sch = Schedule(func)
    if not has_root(sch) or not func.params:
        return None
    data = func.params[0]  # TVM 0.27: PrimFunc parameters are the buffers
    if len(data.shape) != 4 or str(data.dtype) != "float32":
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = reduction_blocks(sch, blocks)
    if len(reductions) != 1:
        return None
    conv = reductions[0]
    stmt = sch.get(conv)
    extents = iter_extents(stmt)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if extents is None or len(extents) != 7 or kinds[4:] != [COMM_REDUCE] * 3 or extents[6] > STEM_CHANNELS:
        return None
    if int(data.shape[3]) != extents[6]:
        return None
    readers = [b for b in blocks if _reads(sch.get(b), data)]
    if len(readers) != 1:
        return None
    reader = readers[0]
    if sch.get(reader).same_as(stmt):
        sch.transform_layout(conv, ("read", _read_index(stmt, data)), _TO_NCHW)
        return sch.mod["main"]
    # a padded copy of the data that only the convolution reads: it gathers from the NCHW data, so the
    # convolution's tile reads the same NHWC copy as before and one pass over the image is saved
    pad = sch.get(reader)
    padded = type(getattr(pad.body, "value", None)).__name__ not in ("BufferLoad", "TensorLoad")
    if padded and extents[4] * extents[5] > MAX_PADDED_TAPS:
        return None
    if len(pad.writes) != 1 or len(pad.iter_vars) != 4 or any(iv.iter_type != DATA_PAR for iv in pad.iter_vars):
        return None
    consumers = sch.get_consumers(reader)
    if len(consumers) != 1 or not sch.get(consumers[0]).same_as(stmt):
        return None
    sch.transform_layout(reader, ("read", _read_index(pad, data)), _TO_NCHW)
    return sch.mod["main"]


def _read_index(block: Any, buf: Any) -> int:
    return next(i for i, r in enumerate(block.reads) if r.source.same_as(buf))


@mutator
class _StemInputs(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.kernels = {gv.name_hint for gv in mod.get_global_vars()}  # the module's own (not rewritten ones)
        self.rewritten: dict[str, Any] = {}  # kernel name -> its NCHW-reading global

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or not isinstance(call.args[1], relax.Tuple):
            return call
        kernel, args = call.args[0], list(call.args[1].fields)
        if not args or not isinstance(args[0], relax.Var):
            return call
        source = self.lookup_binding(args[0])
        if not isinstance(source, relax.Call) or source.op != call.op or \
                source.args[0].name_hint not in self.kernels or not is_nchw_to_nhwc(self.mod_[source.args[0]]):
            return call
        name = kernel.name_hint
        if name not in self.rewritten:
            new = nchw_stem(self.mod_[kernel])
            self.rewritten[name] = None if new is None else self.builder_.add_func(new, f"{name}_nchw")
        gv = self.rewritten[name]
        if gv is None:
            return call
        return relax.call_tir(gv, relax.Tuple([source.args[1].fields[0], *args[1:]]), call.ty)


@tvm.transform.module_pass(opt_level=0, name="KilnStemReadsNCHW")
class StemReadsNCHW:
    """Stem convolutions (at most ``STEM_CHANNELS`` input channels) read the NCHW graph input in place of its
    NHWC transpose; the transpose kernel goes when nothing else reads it."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _StemInputs(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        out: tvm.IRModule = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
        return out
