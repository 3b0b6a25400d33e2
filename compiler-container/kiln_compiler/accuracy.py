"""Accuracy on the record: how a quantized (QDQ) ONNX model's artifact agrees with ONNX Runtime.

For an ONNX model holding QuantizeLinear/DequantizeLinear nodes, the job runs the built artifact
(``kiln.runtime``, as a user would) and ONNX Runtime on the same QDQ model with the same seeded
random inputs, and records per output the largest difference and the share of identical values;
an output that a per-tensor DequantizeLinear produces is also compared in its quantization units
(the reference for integer arithmetic: Kiln's requantization may land on the other side of a .5
tie than ONNX Runtime's, 1 unit, see ``kiln_compiler.graph.quantized``). It runs in a child
process like the profile (a crashing artifact never fails the job) and is skipped, with the
reason, where this host cannot run the artifact. ONNX Runtime runs in its x64 precision mode
(``reference_session``): without VNNI its u8 x s8 kernels saturate 16-bit pair sums.

``python -m kiln_compiler.accuracy ARTIFACT_DIR MODEL.onnx`` is the child; it prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ACCURACY_VERSION = 1
SAMPLES = 2  # seeded random inputs compared per job
TIMEOUT_S = 120.0
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) add pairs of
# products in 16 bits and saturate (vpmaddubsw): on a Zen 3 host a quantize_static CNN's outputs were 25 %
# off by a unit or more. Its x64 precision mode re-signs the weights for exact u8 x u8 kernels there (no
# change on VNNI CPUs or other architectures): the reference is then integer arithmetic on every host.
EXACT_INTEGER_CONFIG = {"session.x64quantprecision": "1"}
REFERENCE = "CPUExecutionProvider, session.x64quantprecision=1"


def reference_session(model: str | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime session on ``model`` (a path or serialized bytes) whose integer kernels are exact."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    for key, value in EXACT_INTEGER_CONFIG.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def qdq_model_file(model_dir: Path, framework: str, model_files: list[str]) -> Path | None:
    """The model's ONNX file when it is a QDQ model (holds QuantizeLinear/DequantizeLinear), else None."""
    if framework != "ONNX" or len(model_files) != 1:
        return None
    import onnx

    path = model_dir / model_files[0]
    graph = onnx.load(str(path), load_external_data=False).graph
    return path if any(n.op_type in _QDQ_OPS for n in graph.node) else None


def not_measured(reason: str) -> dict[str, Any]:
    """The accuracy member of a job whose agreement could not be measured, with the reason."""
    return {"version": ACCURACY_VERSION, "measured": False, "reason": reason}


def output_units(model: Any) -> dict[str, float]:
    """Quantization scale of each graph output that a per-tensor DequantizeLinear produces."""
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in model.graph.node for out in node.output}
    units = {}
    for output in model.graph.output:
        node = producers.get(output.name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        scale = constants.get(node.input[1])
        if scale is not None and scale.size == 1:
            units[output.name] = float(scale.reshape(()))
    return units


def measure(root: Path, model_file: Path, samples: int = SAMPLES) -> dict[str, Any]:
    """Run the artifact at ``root`` and ONNX Runtime on ``model_file`` on ``samples`` seeded inputs; compare."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from kiln import runtime

    from .profile import random_feeds

    artifact = runtime.load(root)
    model = onnx.load(str(model_file))
    units = output_units(model)
    session = reference_session(str(model_file))
    names = [o.name for o in session.get_outputs()]
    worst: dict[str, float] = dict.fromkeys(names, 0.0)
    worst_units: dict[str, float] = dict.fromkeys(units, 0.0)
    same: dict[str, int] = dict.fromkeys(names, 0)
    count: dict[str, int] = dict.fromkeys(names, 0)
    for seed in range(samples):
        feeds = random_feeds(artifact, seed)
        got = artifact.run(feeds)
        want = session.run(None, feeds)
        for name, a, b in zip(names, got, want, strict=True):
            diff = np.abs(np.asarray(a, dtype="float64") - np.asarray(b, dtype="float64"))
            worst[name] = max(worst[name], float(diff.max(initial=0.0)))
            same[name] += int(np.count_nonzero(diff == 0))
            count[name] += int(diff.size)
            if name in units:
                worst_units[name] = max(worst_units[name], float(np.rint(diff / units[name]).max(initial=0.0)))
    outputs = []
    for name in names:
        row: dict[str, Any] = {"name": name, "max_abs_diff": worst[name],
                               "identical_pct": round(100.0 * same[name] / max(count[name], 1), 3)}
        if name in units:
            row["unit"] = units[name]
            row["max_abs_diff_units"] = int(worst_units[name])
        outputs.append(row)
    result: dict[str, Any] = {"reference": f"onnxruntime {ort.__version__} ({REFERENCE}), same QDQ model",
                              "inputs": samples, "outputs": outputs,
                              "identical_pct": min(r["identical_pct"] for r in outputs)}
    if worst_units:
        result["max_abs_diff_units"] = int(max(worst_units.values()))
    return result


def agreement(root: Path, model_file: Path, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """The accuracy member for the artifact at ``root`` vs ONNX Runtime on ``model_file``, from a child process.

    A failing or overrunning child gives ``measured: false`` with the reason: it never fails a job."""
    from .profile import run_measuring_child

    measured = run_measuring_child(["kiln_compiler.accuracy", str(root), str(model_file)], timeout_s)
    if measured == "timeout":
        return not_measured(f"the comparison with ONNX Runtime did not finish within {timeout_s:.0f} s")
    if isinstance(measured, str):
        return not_measured(f"the artifact or the reference could not be run: {measured}")
    return {"version": ACCURACY_VERSION, "measured": True, **measured}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m kiln_compiler.accuracy ARTIFACT_DIR MODEL.onnx")
    print(json.dumps(measure(Path(argv[0]), Path(argv[1]))))


if __name__ == "__main__":
    main(sys.argv[1:])
