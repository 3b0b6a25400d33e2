"""The CPU graph pipeline: convolutions in NHWC with HWIO weights, and the rewrites it needs.

Output channels become the innermost, contiguous axis: the default schedule then vectorises over
output channels (full vectors for every layer width, no strided gathers) and unrolls over output
pixels, each input value being one broadcast reused by a whole vector of channels. Relax's
ConvertLayout carries the layout through layout-agnostic operators (elementwise, pooling, concat,
batch norm) and transposes only at the edges (graph input, reshape, flatten).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .affine_fold import FoldAffineIntoGroupWeights
from .fold import PrefoldConstants
from .grouped_conv import PadConvChannels, SplitGroupedConv
from .shuffle import ChannelShuffleNHWC
from .shuffle_fold import ShuffleIntoGroupMatmul
from .simplify import (
    ChannelWindowToSlices,
    ConstantsToFullRank,
    DivideByConstantToMultiply,
    FlattenConcat,
    PowerToRoots,
    RemoveInferenceDropout,
    SumOfStackToAdd,
)


def _simplify() -> list[tvm.transform.Pass]:
    return [RemoveInferenceDropout(), SumOfStackToAdd(), ConstantsToFullRank(), DivideByConstantToMultiply(),
            PowerToRoots(), ChannelWindowToSlices()]


def cpu_graph_passes(lanes: int = 16, prefold: bool = True, fp32_shuffle_units: bool = True) -> list[tvm.transform.Pass]:
    """Passes that convert conv2d (and what follows it) to NHWC / HWIO; ``lanes``: fp32 vector width;
    ``prefold=False`` leaves all constant folding to LLVM builds (the same module, slower: tests compare);
    ``fp32_shuffle_units=False`` (bf16 compiles) keeps ShuffleNet's fp32 grouped matmuls as before ADR 0044:
    epilogues below the NHWC reshape, shuffles as kernels (ConvToBF16 converts those matmuls)."""
    fold = [PrefoldConstants()] if prefold else []  # numpy folds what needs no LLVM build (ADR 0040)
    shuffles = [ShuffleIntoGroupMatmul()] if fp32_shuffle_units else []  # fp32 grouped matmuls only (ADR 0044)
    # batch norms into the weights of fp32 grouped 1x1 and depthwise convs (ADR 0054)
    affine = [FoldAffineIntoGroupWeights()] if fp32_shuffle_units else []
    return [
        relax.transform.DecomposeOpsForInference(),
        *_simplify(),
        relax.transform.CanonicalizeBindings(),  # ConvertLayout loses the layout across aliases
        *fold,
        relax.transform.FoldConstant(),  # bias reshapes: ConvertLayout trips over shape tuples
        # again on the folded constants: a QDQ model's per-channel (C, 1, 1) Mul/Add operands are
        # quantize -> dequantize chains until folded (DenseNet's NCHW round trips, ADR 0047)
        ConstantsToFullRank(),
        relax.transform.DeadCodeElimination(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        relax.transform.Normalize(),
        *fold,
        relax.transform.FoldConstant(),  # HWIO weights as constants for the conv rewrites
        *_simplify(),  # again, now that batch norm's 1/sqrt(var + eps) is a constant
        FlattenConcat(),  # DenseNet: one flat concat per layer, fused into its batch norm
        SplitGroupedConv(lanes, fp32_epilogues=fp32_shuffle_units),
        PadConvChannels(lanes),
        *affine,
        ChannelShuffleNHWC(),
        *shuffles,
        relax.transform.DeadCodeElimination(),  # the NCHW shuffle chains
        relax.transform.EliminateCommonSubexpr(),  # one input transpose per graph input
    ]
