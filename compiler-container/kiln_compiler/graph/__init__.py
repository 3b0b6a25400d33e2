"""Relax graph rewrites for CPU targets, one named pass per rewrite (see ``cpu_graph_passes``)."""

from .grouped_conv import PadConvChannels, SplitGroupedConv
from .layout import cpu_graph_passes
from .quantized import PerTensorQDQToArithmetic, QuantizedConvToInteger, SimplifyRequantization
from .quantized_data import EightBitDataMovement
from .shuffle import ChannelShuffleNHWC
from .simplify import (
    ChannelWindowToSlices,
    ConstantsToFullRank,
    DivideByConstantToMultiply,
    FlattenConcat,
    PowerToRoots,
    RemoveInferenceDropout,
    SumOfStackToAdd,
)

__all__ = ["ChannelShuffleNHWC", "ChannelWindowToSlices", "ConstantsToFullRank", "DivideByConstantToMultiply",
           "EightBitDataMovement", "FlattenConcat", "PadConvChannels", "PerTensorQDQToArithmetic", "PowerToRoots",
           "QuantizedConvToInteger", "RemoveInferenceDropout", "SimplifyRequantization", "SplitGroupedConv",
           "SumOfStackToAdd", "cpu_graph_passes"]
