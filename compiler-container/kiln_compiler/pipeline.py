"""Turn a Relax IRModule into a VM executable: graph rewrites, tuning records, default schedules.

CPU (llvm) targets first get Kiln's graph rewrites (``kiln_compiler.graph``: convolutions in
NHWC with HWIO weights, so output channels are the contiguous innermost axis), then every kernel
without a tuning record (``kiln_compiler.tuning``) gets Kiln's default schedule
(``kiln_compiler.schedules``), and the constant weights are re-packed into each kernel's access
order (MetaSchedule's RewriteLayout + SplitLayoutRewritePreproc, folded by FoldConstant).
``default_schedules=False`` is the plain reference build (NCHW, TOPI's unscheduled loops) that the
tests compare against.

Weights must be bound as constants in ``mod`` (``from_onnx(..., keep_params_in_input=False)``):
the weight re-packing is only folded away for constants; weights passed as inputs would be
re-packed on every call.

CUDA targets use TVM's dlight GPU rules (the default CUDA pipeline).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import tvm
from kiln.isa import Arch
from tvm import relax, tirx
from tvm.s_tir import Schedule

from .graph import cpu_graph_passes
from .graph.affine import FoldChannelAffine
from .graph.bf16 import ConvToBF16
from .graph.pool_first import PoolBeforePointwiseConv
from .graph.quantized import (
    AVX2,
    SDOT,
    VNNI,
    IntegerKernels,
    PerTensorQDQToArithmetic,
    QuantizedConvToInteger,
    SimplifyRequantization,
)
from .graph.quantized_data import EightBitDataMovement
from .options import TuningBudget
from .schedules import DefaultCPUSchedule, has_root, target_cpu, target_lanes, target_vector_unit
from .schedules.bf16 import BF16ConvSchedule
from .schedules.int8 import VNNIConvSchedule
from .schedules.int8_arm import SdotConvSchedule
from .schedules.int8_avx2 import PmaddwdConvSchedule
from .schedules.interleave import InputInterleaveSchedule
from .schedules.stack import TIR_PIPELINE
from .schedules.stem import StemReadsNCHW
from .tuning import Shard, TuningDatabase, tune_and_apply

log = logging.getLogger(__name__)


@dataclass
class CompiledRelax:
    """A compiled model and how its kernels were scheduled."""

    executable: Any  # relax VM Executable: .export_library(path, fcompile=...)
    summary: dict[str, int] = field(default_factory=lambda: {"tuned": 0, "reused": 0, "default": 0})
    unscheduled: list[str] = field(default_factory=list)  # kernels the default schedule could not handle


def make_target(target: dict[str, Any], host: dict[str, Any] | None = None) -> tvm.target.Target:
    """A tvm Target from catalog JSON dicts."""
    if host is not None:
        return tvm.target.Target(target, host=tvm.target.Target(host))
    return tvm.target.Target(target)


def _fuse_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def _finalize_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def _rewrite_layouts(mod: tvm.IRModule) -> tvm.IRModule:
    """Re-pack layout-free (constant) weights into each scheduled kernel's access order."""
    from tvm.s_tir import meta_schedule as ms

    post = ms.postproc.RewriteLayout()
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or "layout_free_buffers" not in (func.attrs or {}):
            continue
        sch = Schedule(func)
        if _has_layout_rewrite(sch):
            continue  # applied from a tuning record whose trace already re-packs the weights
        try:
            if post.apply(sch):
                updates[gv] = sch.mod["main"]
        except Exception as exc:
            log.debug("layout rewrite failed for %s: %s", gv.name_hint, exc)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _has_layout_rewrite(sch: Schedule) -> bool:
    if not has_root(sch):
        return False
    return any("meta_schedule.layout_rewrite_preproc" in sch.get(blk).annotations
               for blk in sch.get_child_blocks(sch.get_sblock("root")))


def _compile_reserve(mod: tvm.IRModule) -> float:
    """Seconds to keep for code generation after tuning (measured: ~0.4 s per kernel)."""
    return 15.0 + 0.5 * count_kernels(mod)


def count_kernels(mod: tvm.IRModule) -> int:
    """Number of PrimFuncs (kernels) in ``mod``."""
    return sum(1 for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def _with_num_cores(target: dict[str, Any]) -> dict[str, Any]:
    if target.get("kind") == "llvm" and "num-cores" not in target:
        # MetaSchedule needs it; it is part of the tuning-record key (records are per core count)
        return {**target, "num-cores": os.cpu_count() or 1}
    return target


def integer_kernels(tgt: tvm.target.Target) -> IntegerKernels | None:
    """The integer convolution kernels a CPU target gets for QDQ int8 models: AVX512-VNNI's u8 x s8
    ``vpdpbusd`` (ADR 0018), aarch64 dotprod's s8 x s8 ``sdot`` (Graviton2+, ADR 0060), AVX2's s16 x s16
    ``vpmaddwd`` (ADR 0059); None: fp32 convolutions on the integer values (ADR 0021)."""
    cpu = target_cpu(tgt)
    if "avx512_vnni" in cpu.features:
        return VNNI
    if cpu.arch is Arch.AARCH64 and "asimddp" in cpu.features:
        return SDOT
    # AVX2 without AVX-512 (ml_c4, ADR 0059): AVX-512 without VNNI (ml_c5) keeps its 16-lane fp32 kernels,
    # which the 8-lane vpmaddwd tile was not measured against
    if "avx2" in cpu.features and "avx512f" not in cpu.features:
        return AVX2
    return None


def _integer_schedule(kernels: IntegerKernels | None) -> Any:
    """The schedule pass of ``kernels`` (a module pass with ``.scheduled``), or None."""
    if kernels is VNNI:
        return VNNIConvSchedule()
    if kernels is SDOT:
        return SdotConvSchedule()
    if kernels is AVX2:
        return PmaddwdConvSchedule()
    return None


def _cpu_kernels(mod: tvm.IRModule, tgt: tvm.target.Target, default_schedules: bool,
                 precision: str = "fp32") -> tvm.IRModule:
    """The graph rewrites and fusion that make ``mod``'s kernels (inside ``with tgt``): what is tuned and scheduled."""
    if default_schedules:
        # QDQ chains become integer convolutions before the layout rewrites (ADR 0018)
        mod = tvm.transform.Sequential([QuantizedConvToInteger(integer_kernels(tgt)), EightBitDataMovement(),
                                        PerTensorQDQToArithmetic(),
                                       *cpu_graph_passes(target_lanes(tgt), fp32_shuffle_units=precision == "fp32"),
                                        SimplifyRequantization()])(mod)
    # DenseNet's transitions pool before their 1x1 convolution: a quarter of its work (ADR 0053)
    # and batch norm chains as one multiply-add (ADR 0053)
    mod = tvm.transform.Sequential([PoolBeforePointwiseConv(), FoldChannelAffine()])(mod)
    if precision == "bf16":
        mod = ConvToBF16()(mod)  # type: ignore[operator]
    fused = tvm.transform.Sequential(_fuse_passes())(mod)
    if default_schedules:
        fused = StemReadsNCHW()(fused)  # type: ignore[operator]  # no input transpose kernel (ADR 0045)
    return relax.transform.AttachAttrLayoutFreeBuffers()(fused)


def tune_relax(mod: tvm.IRModule, target: dict[str, Any], *, shard: Shard, tuning: TuningBudget | None,
               database: TuningDatabase, host: dict[str, Any] | None = None,
               deadline: float | None = None, precision: str = "fp32") -> dict[str, int]:
    """One tuning worker (ADR 0023): tune ``shard``'s share of the kernels ``compile_relax`` would tune into
    ``database``, keeping time before ``deadline`` for the build that follows; builds nothing.

    Returns ``{"kernels": share size, "tuned": n, "reused": n}`` (nothing to tune for a non-CPU target)."""
    started = time.time()
    target = _with_num_cores(target)
    tgt = make_target(target, host)
    if tgt.kind.name != "llvm":
        return {"kernels": 0, "tuned": 0, "reused": 0}
    with tgt:
        fused = _cpu_kernels(mod, tgt, True, precision)
        # the build redoes these passes and then generates code: keep time for both
        reserve = _compile_reserve(fused) + 2 * (time.time() - started)
        _, counts = tune_and_apply(fused, tgt, database=database, tuning=tuning, deadline=deadline,
                                   reserve_seconds=reserve, shard=shard)
    return counts


def compile_relax(
    mod: tvm.IRModule,
    target: dict[str, Any],
    *,
    host: dict[str, Any] | None = None,
    tuning: TuningBudget | None = None,
    database: TuningDatabase | None = None,
    deadline: float | None = None,
    default_schedules: bool = True,
    precision: str = "fp32",
) -> CompiledRelax:
    """Compile ``mod`` (weights bound as constants) for ``target``, finishing before ``deadline``.

    Kernels found in ``database`` are applied ("reused"); with a ``tuning`` budget, the rest
    are tuned first (only for a target that matches this machine, see kiln_compiler.tuning) and
    recorded ("tuned"); every other kernel gets the default schedule ("default"). ``precision``
    "bf16" computes convolutions and matrix products in bf16 with fp32 accumulation (ADR 0022).
    """
    target = _with_num_cores(target)
    tgt = make_target(target, host)
    summary = {"tuned": 0, "reused": 0, "default": 0}
    unscheduled: list[str] = []
    if tgt.kind.name != "llvm":
        with tgt:
            lowered = relax.get_default_pipeline(tgt)(mod)
        summary["default"] = count_kernels(lowered)
        return CompiledRelax(executable=tvm.compile(lowered, target=tgt, relax_pipeline=None), summary=summary)

    with tgt:
        fused = _cpu_kernels(mod, tgt, default_schedules, precision)
        if database is not None:
            fused, counts = tune_and_apply(fused, tgt, database=database, tuning=tuning, deadline=deadline,
                                           reserve_seconds=_compile_reserve(fused))
            summary["tuned"], summary["reused"] = counts["tuned"], counts["reused"]
        if default_schedules:
            integer = _integer_schedule(integer_kernels(tgt))
            if integer is not None:
                fused = integer(fused)
            interleave = InputInterleaveSchedule()
            fused = interleave(fused)  # type: ignore[operator]
            bf16 = BF16ConvSchedule(target_vector_unit(tgt))
            if "avx512_bf16" in target_cpu(tgt).features:
                fused = bf16(fused)  # type: ignore[operator]
            pass_ = DefaultCPUSchedule(target_vector_unit(tgt))
            fused = pass_(fused)  # type: ignore[operator]
            summary["default"] = pass_.scheduled + len(integer.scheduled if integer else []) + len(bf16.scheduled) + len(interleave.scheduled)
            unscheduled = pass_.failed
            if unscheduled:
                log.warning("%d kernels kept TVM's unscheduled loops: %s", len(unscheduled), ", ".join(unscheduled))
        fused = _rewrite_layouts(fused)
        fused = tvm.transform.Sequential(
            [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant(),
             relax.transform.DeadCodeElimination()]
        )(fused)
        lowered = tvm.transform.Sequential(_finalize_passes())(fused)
    if deadline is not None and time.time() > deadline:
        log.warning("compile passed its deadline before code generation")
    # TVM's TIR pipeline with the register tiles' accumulators kept on the stack (ADR 0057)
    ex = tvm.compile(lowered, target=tgt, relax_pipeline=None, tir_pipeline=TIR_PIPELINE)
    return CompiledRelax(executable=ex, summary=summary, unscheduled=unscheduled)
