"""PrefoldConstants (ADR 0040): numpy folds constants to exactly the bits TVM's LLVM-built folder computes,
so the graph the CPU pipeline makes is the same, constants included, with fewer LLVM builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from kiln_compiler.graph import cpu_graph_passes
from kiln_compiler.graph.fold import PrefoldConstants, fold_call
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import residual_bn_block


def _tvm_folded(expr: relax.Expr) -> np.ndarray:
    """``expr`` (all-constant arguments) folded by Relax's own FoldConstant: legalized, built with LLVM, run."""
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            out = bb.emit_output(expr)
        bb.emit_func_output(out)
    folded = relax.transform.FoldConstant()(bb.get())
    value = folded["main"].body.body
    for block in folded["main"].body.blocks:  # the result may stay bound to a variable
        value = next((b.value for b in block.bindings if b.var.same_as(value)), value)
    assert isinstance(value, tvm.ir.expr.Constant), f"FoldConstant left {value}"
    return value.value.numpy()


def _awkward_floats(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values whose products and quotients round: random mantissas over many exponents, a zero, a negative."""
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))).astype("float32")
    x.flat[0] = 0.0
    return x


CASES = {
    "add broadcast": lambda a, b: relax.op.add(a, b),
    "subtract": lambda a, b: relax.op.subtract(a, b),
    "multiply broadcast": lambda a, b: relax.op.multiply(a, b),
    "divide": lambda a, b: relax.op.divide(a, b),
    "sqrt": lambda a, b: relax.op.sqrt(b),
    "permute_dims": lambda a, b: relax.op.permute_dims(a, [2, 0, 1]),
    "reshape": lambda a, b: relax.op.reshape(a, (8, 3, 4)),
    "expand_dims": lambda a, b: relax.op.expand_dims(b, [0]),
    "squeeze": lambda a, b: relax.op.squeeze(relax.const(b.value.numpy().reshape(6, 1, 4)), [1]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_fold_has_the_bits_of_tvms_llvm_fold(name: str) -> None:
    """GIVEN an operator on constants (float32 values that round, broadcasting where the op allows it)
    WHEN numpy folds it (fold_call) and Relax's FoldConstant folds it (an LLVM build)
    THEN both give the same array, bit for bit."""
    rng = np.random.default_rng(7)
    a = relax.const(_awkward_floats(rng, (4, 6, 4)))
    b = relax.const(np.abs(_awkward_floats(rng, (6, 4))) + np.float32(1e-30))
    call = CASES[name](a, b)
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            inner = bb.normalize(call)
            out = bb.emit_output(inner)
        bb.emit_func_output(out)
    normalized = bb.get()["main"].body.blocks[0].bindings[-1].value
    args = [x.value.numpy() for x in normalized.args[:1 if name in ("reshape", "expand_dims", "squeeze") else None]
            if isinstance(x, tvm.ir.expr.Constant)]
    ours = fold_call(normalized, args)
    assert ours is not None, f"fold_call refused {name}"
    theirs = _tvm_folded(call)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.tobytes() == theirs.tobytes(), f"{name}: numpy and TVM's fold differ in bits"


def test_fold_call_leaves_what_it_cannot_compute_exactly() -> None:
    """GIVEN calls numpy might not compute to TVM's bits (float16 arithmetic, exp)
    WHEN fold_call is asked THEN it declines (FoldConstant folds them with LLVM as before)."""
    half = relax.const(np.ones((4,), "float16"))
    single = relax.const(np.ones((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            add16 = bb.normalize(relax.op.add(half, half))
            exp32 = bb.normalize(relax.op.exp(single))
            out = bb.emit_output(relax.Tuple([add16, exp32]))
        bb.emit_func_output(out)
    assert fold_call(add16, [np.ones(4, "float16")] * 2) is None
    assert fold_call(exp32, [np.ones(4, "float32")]) is None


def _graph(mod: Any, prefold: bool) -> tuple[Any, int]:
    """``mod`` through the CPU graph passes, and how many calls PrefoldConstants folded."""
    passes = cpu_graph_passes(16, prefold=prefold)
    out = tvm.transform.Sequential(passes)(mod)
    prefolds = {id(p): p for p in passes if isinstance(p, PrefoldConstants)}  # one instance, listed twice
    return out, sum(p.folded for p in prefolds.values())


@pytest.mark.parametrize("model", ["residual_bn_block", "qdq_residual_block", "squeezenet"])
def test_prefold_makes_the_same_graph(model: str, squeezenet: Any, qdq_residual_block_dir: Path) -> None:
    """GIVEN a model with constants to fold (a ResNet block's batch norms and weight transposes, the same
    block quantized to QDQ, SqueezeNet's biases)
    WHEN the CPU graph passes run with and without PrefoldConstants
    THEN the modules are structurally equal, every constant's bits included, and numpy folded calls."""
    onnx_model, shapes = {"residual_bn_block": (residual_bn_block(), {"input": [1, 16, 16, 16]}),
                          "qdq_residual_block": (onnx.load(str(qdq_residual_block_dir / "model.onnx")),
                                                 {"input": [1, 16, 16, 16]}),
                          "squeezenet": (squeezenet, {"data_0": [1, 3, 224, 224]})}[model]
    mod = from_onnx(onnx_model, shape_dict=shapes, keep_params_in_input=False)
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}):
        reference, none = _graph(mod, prefold=False)
        prefolded, folded = _graph(mod, prefold=True)
    assert none == 0
    assert folded > 0
    assert tvm_ffi.structural_equal(prefolded, reference)
