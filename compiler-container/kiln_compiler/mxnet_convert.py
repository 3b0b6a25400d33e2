"""Export an MXNet symbol + params checkpoint to ONNX (run by the isolated MXNet interpreter, not by Kiln).

Usage: python mxnet_convert.py MODEL_DIR SHAPES_JSON OUT.onnx

SHAPES_JSON is DataInputConfig's shapes: ``{"data": [1, 3, 224, 224]}`` (by name) or ``[[1, 3, 224, 224]]`` (by
position, in the order the symbol lists its data inputs), NCHW. On success prints one JSON line
``{"inputs": [{"name": ..., "shape": [...]}], "symbol": ..., "params": ..., "mxnet": ..., "onnx": ...}``; on failure
prints one line to stderr and exits 1. Imports only the standard library, numpy, mxnet and onnx (Python 3.9).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

_PARAMS = re.compile(r"^(?P<prefix>.*)-(?P<epoch>\d{4})\.params$")


class ConvertError(Exception):
    """A problem with the user's model or DataInputConfig: the message is shown to the user."""


def _checkpoint_name(path: Path) -> tuple[str, int]:
    """(prefix, epoch) of a ``PREFIX-NNNN.params`` file; ("", -1) for any other name."""
    match = _PARAMS.match(path.name)
    return (match.group("prefix"), int(match.group("epoch"))) if match else ("", -1)


def _visible(model_dir: Path, pattern: str) -> list[Path]:
    return sorted(
        p for p in model_dir.rglob(pattern)
        if p.is_file() and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(model_dir).parts)
    )


def find_checkpoint(model_dir: Path) -> tuple[Path, Path]:
    """The ``PREFIX-symbol.json`` file and its ``PREFIX-NNNN.params`` (highest epoch) in ``model_dir``."""
    symbols = _visible(model_dir, "*-symbol.json")
    params = [p for p in _visible(model_dir, "*.params") if _checkpoint_name(p)[1] >= 0]
    rel = [str(p.relative_to(model_dir)) for p in symbols]
    if not symbols:
        raise ConvertError("no MXNet symbol file (*-symbol.json) found in the archive; package the checkpoint as "
                           "model-symbol.json and model-0000.params")
    if len(symbols) > 1:
        raise ConvertError(f"the archive contains several MXNet symbol files {rel}; include exactly one model")
    symbol = symbols[0]
    prefix = symbol.name[: -len("-symbol.json")]
    matching = [p for p in params if p.parent == symbol.parent and _checkpoint_name(p)[0] == prefix]
    if not matching and len(params) == 1:
        matching = params
    if not matching:
        raise ConvertError(f"no MXNet params file ({prefix}-NNNN.params) found next to '{rel[0]}'; package the "
                           "checkpoint as model-symbol.json and model-0000.params")
    return symbol, max(matching, key=lambda p: _checkpoint_name(p)[1])


# Operators safe to evaluate ahead of time when all their inputs are known (no randomness, no side effects).
_FOLDABLE = {"Add", "Sub", "Mul", "Div", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Cast", "Reshape",
             "Range", "ReduceProd", "Identity", "Constant", "ConstantOfShape", "Equal", "Where", "Max", "Min"}


def fold_shape_arithmetic(model: Any) -> Any:
    """Evaluate ``Shape`` of statically shaped tensors and the arithmetic on it (mx.onnx emits such subgraphs,
    e.g. Shape(Shape(x)) for FullyConnected) so that the result holds only constants; the compiler's ONNX
    frontend cannot take the shape of a shape."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    static = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            static[vi.name] = [d.dim_value for d in dims]
    initializers = {i.name for i in graph.initializer}
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    folded = {}
    kept = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Shape" and node.input[0] in static:
            shape = static[node.input[0]]
            start, end = attrs.get("start", 0), attrs.get("end", len(shape))
            folded[node.output[0]] = known[node.output[0]] = np.array(shape[start:end], dtype=np.int64)
        elif (node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx")
              and all(i in known for i in node.input if i)
              and (node.op_type == "Constant" or any(i in folded for i in node.input if i))):
            values = ReferenceEvaluator(node, opsets={"": opset}).run(
                None, {i: known[i] for i in node.input if i})
            for name, value in zip(node.output, values):  # noqa: B905 (Python 3.9: no strict=)
                folded[name] = known[name] = np.asarray(value)
        else:
            kept.append(node)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    for name, value in folded.items():
        if name in used and name not in initializers:
            graph.initializer.append(numpy_helper.from_array(value, name))
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    return model


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: mxnet_convert.py MODEL_DIR SHAPES_JSON OUT.onnx", file=sys.stderr)
        return 2
    model_dir, shapes, out = Path(argv[1]), json.loads(argv[2]), Path(argv[3])
    try:
        symbol_path, params_path = find_checkpoint(model_dir)
        import mxnet as mx
        import numpy as np
        import onnx

        try:
            sym = mx.sym.load(str(symbol_path))
        except Exception as exc:
            raise ConvertError(f"'{symbol_path.name}' is not a valid MXNet symbol file ({_first(exc)})") from None
        try:
            saved = mx.nd.load(str(params_path))
        except Exception as exc:
            raise ConvertError(f"'{params_path.name}' is not a valid MXNet params file ({_first(exc)})") from None
        if not isinstance(saved, dict):
            raise ConvertError(f"'{params_path.name}' holds an unnamed list of arrays, not a checkpoint's params")
        params = {k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k: v for k, v in saved.items()}
        data_names = [n for n in sym.list_inputs() if n not in params]
        if not data_names:
            raise ConvertError("every input of the MXNet symbol has a value in the params file; the model has no "
                               "data input")
        if isinstance(shapes, dict):
            unknown = sorted(set(shapes) - set(data_names))
            missing = [n for n in data_names if n not in shapes]
            if unknown or missing:
                raise ConvertError(
                    f"DataInputConfig names {sorted(shapes)} but the MXNet model's data inputs are {data_names}"
                    + (f" (no shape for {missing})" if missing else "")
                )
            in_shapes = [[int(d) for d in shapes[n]] for n in data_names]
        else:
            if len(shapes) != len(data_names):
                raise ConvertError(f"DataInputConfig lists {len(shapes)} shape(s) but the MXNet model has "
                                   f"{len(data_names)} data input(s) {data_names}")
            in_shapes = [[int(d) for d in s] for s in shapes]
        missing_params = sorted(set(sym.list_arguments() + sym.list_auxiliary_states()) - set(params)
                                - set(data_names))
        if missing_params:
            raise ConvertError(f"the params file lacks {missing_params[:10]}")
        try:
            mx.onnx.export_model(sym, params, in_shapes=in_shapes, in_types=[np.float32] * len(in_shapes),
                                 onnx_file_path=str(out))
        except Exception as exc:
            raise ConvertError(f"mx.onnx could not export the model to ONNX: {_first(exc)}") from None
        try:
            model = fold_shape_arithmetic(onnx.load(str(out)))
            onnx.checker.check_model(model)
            onnx.save(model, str(out))
        except Exception as exc:
            raise ConvertError(f"the ONNX model exported by mx.onnx is not valid: {_first(exc)}") from None
        print(json.dumps({
            "inputs": [{"name": n, "shape": s} for n, s in zip(data_names, in_shapes)],  # noqa: B905
            "symbol": str(symbol_path.relative_to(model_dir)),
            "params": str(params_path.relative_to(model_dir)),
            "mxnet": mx.__version__,
            "onnx": onnx.__version__,
        }))
        return 0
    except ConvertError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Exception as exc:  # anything else is still reported on one line
        print(f"MXNet conversion failed: {type(exc).__name__}: {_first(exc)}", file=sys.stderr)
        return 1


def _first(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
