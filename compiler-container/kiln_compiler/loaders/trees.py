"""Shared helpers for tree-ensemble loaders (Treelite models)."""

from __future__ import annotations

import json
from typing import Any

from kiln.runtime import TensorSpec

from ..options import DataInputConfig
from . import resolve_shapes


def tree_specs(model: Any, config: DataInputConfig, framework: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input/output specs of a Treelite model; batch dimension is -1 (any)."""
    header = json.loads(model.dump_as_json(pretty_print=False))
    num_feature = int(header["num_feature"])
    num_target = int(header.get("num_target", 1))
    num_class = max(int(c) for c in header.get("num_class", [1]))
    name = next(iter(config.by_name), "data")
    if config.by_name or config.by_position:
        given = config.by_name.get(name) or config.by_position[0]
        resolve_shapes([(name, (None, num_feature), "float32")], DataInputConfig(by_name={name: given}), framework)
    dtype = "float64" if header.get("threshold_type") == "float64" else "float32"
    inputs = [TensorSpec(name, (-1, num_feature), dtype)]
    outputs = [TensorSpec("predictions", (-1, num_target, num_class), dtype)]
    return inputs, outputs
