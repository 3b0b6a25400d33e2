"""How far a reduced-precision build's outputs are from the fp32 build's, on sample inputs (the record).

A ``"precision": "bf16"`` job also builds the model in fp32 (the same pipeline, Kiln's default
schedules), runs both executables on :data:`SAMPLES` deterministic standard-normal inputs and
records the largest and mean absolute difference of every output, the largest reference magnitude
(to read the error against) and, for outputs shaped like class scores (``[batch, classes]``), how
often the top-1 class agrees. The figures go to the manifest's ``precision`` member and the job
record's ``Kiln.Precision``. Only a host that can run the code measures; elsewhere the record says why.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import numpy as np
from kiln import isa, runtime

from ..loaders import LoadedModel

log = logging.getLogger(__name__)

SAMPLES = 4
SEED = 0


def sample_inputs(model: LoadedModel, count: int = SAMPLES, seed: int = SEED) -> list[dict[str, np.ndarray]]:
    """``count`` deterministic input sets: standard normal floats, integers in [0, 2) (as profiles feed)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        feeds = {}
        for spec in model.inputs:
            shape = tuple(d if d >= 0 else 1 for d in spec.shape)
            if np.dtype(spec.dtype).kind in "iu":
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        batches.append(feeds)
    return batches


def why_not_here(tvm_target: dict[str, Any]) -> str | None:
    """Why this host cannot run code for ``tvm_target`` (None when it can)."""
    features = isa.target_features(tvm_target)
    if not isa.host_can_run(features, runtime.host_machine(), runtime.cpu_flags()):
        return (f"this compiler host ({platform.machine()}) cannot run code for mcpu "
                f"'{tvm_target.get('mcpu')}', so the deviation from fp32 was not measured")
    return None


def run_executable(executable: Any, model: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a relax VM ``executable`` of ``model`` on one input dict in this process; its outputs."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[spec.name]) for spec in model.inputs]
    out = vm["main"](*args)
    items = list(out) if isinstance(out, (tuple, list)) or type(out).__name__ == "Array" else [out]
    return [np.asarray(o.numpy()) for o in items]


def _class_scores(output: np.ndarray) -> bool:
    """Whether an output looks like class scores: [batch, classes] with only unit axes after."""
    return output.ndim >= 2 and output.shape[1] > 1 and all(d == 1 for d in output.shape[2:])


def compare(reduced: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> dict[str, Any]:
    """Max/mean absolute error, largest reference magnitude and top-1 agreement over sample runs."""
    errors, magnitudes = [], []
    agree = total = 0
    for got, want in zip(reduced, reference, strict=True):
        for g, w in zip(got, want, strict=True):
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            errors.append(np.abs(g64 - w64).ravel())
            magnitudes.append(float(np.abs(w64).max()) if w64.size else 0.0)
            if _class_scores(w64):  # [batch, classes] (or [batch, classes, 1, 1], SqueezeNet's)
                g2, w2 = g64.reshape(w64.shape[0], -1), w64.reshape(w64.shape[0], -1)
                agree += int((g2.argmax(axis=1) == w2.argmax(axis=1)).sum())
                total += w64.shape[0]
    flat = np.concatenate(errors) if errors else np.zeros(1)
    result: dict[str, Any] = {
        "max_abs_error": float(flat.max()),
        "mean_abs_error": float(flat.mean()),
        "max_abs_reference": max(magnitudes, default=0.0),
    }
    if total:
        result["top1_agreement"] = round(agree / total, 4)
    return result


def measure(model: LoadedModel, reduced: Any, reference: Any, dtype: str) -> dict[str, Any]:
    """The ``precision`` record of a ``dtype`` build: its outputs vs the fp32 build's on the samples."""
    batches = sample_inputs(model)
    record: dict[str, Any] = {"dtype": dtype, "reference": "fp32 build of the same model", "measured": True,
                              "samples": len(batches), "inputs": f"standard normal, seed {SEED}"}
    record.update(compare([run_executable(reduced, model, b) for b in batches],
                          [run_executable(reference, model, b) for b in batches]))
    return record


def not_measured(dtype: str, reason: str) -> dict[str, Any]:
    """The ``precision`` record when the deviation could not be measured, with the reason."""
    return {"dtype": dtype, "measured": False, "reason": reason}
