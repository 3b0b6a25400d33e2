"""The ``coreml`` target: TensorFlow / Keras / PyTorch models to a Core ML ML Program (``.mlpackage``).

TVM plays no part here: coremltools converts the framework's own model (SageMaker Neo does the same).
The CoreML form of DataInputConfig (see ``kiln.rules``) maps onto coremltools' input types:

* ``shape`` a list of ints: a static shape; with ``"a..b"`` entries: ``ct.RangeDim`` (``"a..-1"`` has no
  upper bound); a list of shapes: ``ct.EnumeratedShapes``; ``default_shape`` is the default of either;
* ``type: "Image"`` (with ``bias``/``scale``): ``ct.ImageType`` (RGB, or grayscale for one channel),
  otherwise ``ct.TensorType``;
* a plain shape list (``{"x": [1, 3, 224, 224]}``) is a static tensor input.

Shapes are in the model's own layout, as coremltools takes them and as the reference's CoreML examples
write them: NHWC for TENSORFLOW and KERAS, NCHW for PYTORCH. CompilerOptions ``class_labels`` names a
newline-separated labels file inside the archive; the model becomes a classifier (``ct.ClassifierConfig``).
The result is an ML Program (coremltools' default precision, float16 compute) for iOS 15 / macOS 12 on.
Core ML runs only on Apple platforms: Linux can convert and inspect the package, not run it.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln import rules
from kiln.catalog import Target
from kiln.runtime import TensorSpec

from ..errors import ClientError, ServerError
from ..loaders import LoadedModel, find_model_files
from ..options import CompilerOptions
from ..package import class_labels
from .base import BuildResult, CompileRequest

log = logging.getLogger(__name__)

PACKAGE_NAME = "model.mlpackage"
_RANGE = re.compile(r"(\d+)\.\.(\d+|-1)")
_MULTIARRAY_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _canon(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


def _shape(ct: Any, spec: dict[str, Any], where: str) -> Any:
    """coremltools' shape for one CoreML input description (static tuple, ct.Shape with RangeDims, EnumeratedShapes)."""
    shape, default = spec["shape"], spec.get("default_shape")
    if shape and all(isinstance(s, list) for s in shape):
        shapes = [tuple(s) for s in shape]
        if default is not None and tuple(default) not in shapes:
            raise ClientError(f"DataInputConfig '{where}': default_shape {default} is not one of the enumerated "
                              f"shapes {[list(s) for s in shapes]}")
        if len({len(s) for s in shapes}) != 1:
            raise ClientError(f"DataInputConfig '{where}': enumerated shapes must all have the same rank")
        if len(shapes) == 1:
            return shapes[0]
        return ct.EnumeratedShapes(shapes=shapes, default=tuple(default) if default else shapes[0])
    if all(isinstance(d, int) for d in shape):
        if default is not None and list(default) != list(shape):
            raise ClientError(f"DataInputConfig '{where}': default_shape {default} differs from the static shape "
                              f"{shape}")
        return tuple(shape)
    if default is not None and len(default) != len(shape):
        raise ClientError(f"DataInputConfig '{where}': default_shape {default} has another rank than {shape}")
    dims: list[Any] = []
    for i, d in enumerate(shape):
        if isinstance(d, int):
            if default is not None and default[i] != d:
                raise ClientError(f"DataInputConfig '{where}': default_shape {default} differs from the fixed "
                                  f"dimension {i} ({d}) of {shape}")
            dims.append(d)
            continue
        match = _RANGE.fullmatch(d)
        assert match is not None  # kiln.rules checked the form
        lo, hi = int(match.group(1)), int(match.group(2))
        if lo < 1 or (hi != -1 and hi < lo):
            raise ClientError(f"DataInputConfig '{where}': range '{d}' must be 'low..high' with 1 <= low <= high "
                              "(or 'low..-1' for no upper bound)")
        dflt = default[i] if default is not None else lo
        if dflt < lo or (hi != -1 and dflt > hi):
            raise ClientError(f"DataInputConfig '{where}': default_shape {default} lies outside the range '{d}'")
        dims.append(ct.RangeDim(lower_bound=lo, upper_bound=hi, default=dflt))
    return ct.Shape(shape=dims)


def _channels(spec: dict[str, Any], channel_last: bool) -> int:
    shape = spec["shape"]
    first = shape[0] if shape and isinstance(shape[0], list) else shape
    c = first[-1] if channel_last else (first[1] if len(first) > 1 else first[0])
    return c if isinstance(c, int) else -1


def coreml_inputs(config: str | None, framework: str, target: Target) -> list[tuple[str | None, dict[str, Any]]]:
    """(name or None, CoreML input description) per DataInputConfig entry, checked by ``kiln.rules``."""
    try:
        specs = rules.parse_data_input_config(config, framework, target)
    except rules.RuleError as exc:
        raise ClientError(exc.message) from None
    out: list[tuple[str | None, dict[str, Any]]] = []
    for spec in specs:
        desc = dict(spec.coreml) if spec.coreml else {"shape": list(spec.shape or ())}
        out.append((_canon(spec.name) if spec.name else None, desc))
    return out


def _input_types(ct: Any, entries: Sequence[tuple[str | None, dict[str, Any]]], channel_last: bool,
                 default_names: Sequence[str] | None = None) -> list[Any]:
    types = []
    for i, (name, desc) in enumerate(entries):
        label = name or (default_names[i] if default_names and i < len(default_names) else f"input{i}")
        shape = _shape(ct, desc, label)
        if desc.get("type", "Tensor") != "Image":
            types.append(ct.TensorType(name=label, shape=shape))
            continue
        channels = _channels(desc, channel_last)
        if channels not in (1, 3):
            raise ClientError(f"DataInputConfig '{label}': an Image input needs 1 (grayscale) or 3 (RGB) channels "
                              f"in the {'last' if channel_last else 'second'} dimension of its shape; got "
                              f"{desc['shape']}")
        bias = desc.get("bias")
        if bias is not None and len(bias) != channels:
            raise ClientError(f"DataInputConfig '{label}': bias {bias} needs one value per channel ({channels})")
        kwargs: dict[str, Any] = {"scale": float(desc.get("scale", 1.0))}
        if bias is not None:
            kwargs["bias"] = [float(b) for b in bias] if channels == 3 else float(bias[0])
        layout = ct.colorlayout.RGB if channels == 3 else ct.colorlayout.GRAYSCALE
        types.append(ct.ImageType(name=label, shape=shape, color_layout=layout, **kwargs))
    return types


def _torch_source(path: Path, entries: list[tuple[str | None, dict[str, Any]]]) -> tuple[Any, str]:
    from ..loaders import pytorch

    if zipfile.is_zipfile(path):  # the PYTORCH loader's caps and pickle check (CoreML takes no allow_pickle)
        pytorch.check_pickled_globals(path, CompilerOptions())
    kind = pytorch._kind(path)
    if kind == "export":
        program = pytorch._load_exported(path)
        flexible = [n or f"#{i}" for i, (n, d) in enumerate(entries)
                    if not all(isinstance(x, int) for x in d["shape"])]
        if flexible:
            raise ClientError(f"flexible shapes (ranges or enumerated shapes) for input(s) {flexible} need a "
                              "TorchScript model (torch.jit.trace(model, args).save('model.pt')) for the coreml "
                              "target; an ExportedProgram's shapes are fixed when it is exported")
        try:
            return program.run_decompositions({}), "torch.export"
        except Exception as exc:
            raise ClientError(f"the ExportedProgram could not be lowered for Core ML: {_first_line(exc)}") from None
    import torch

    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ClientError(f"'{path.name}' could not be loaded as TorchScript ({_first_line(exc)})") from None
    return script.eval(), "TorchScript"


def _keras_source(path: Path) -> Any:
    import tensorflow as tf

    from ..loaders.keras import _load

    model = _load(path)
    names = [str(t.name).split(":")[0] for t in model.inputs]
    signature = [tf.TensorSpec([None, *list(t.shape)[1:]], t.dtype, name=n)
                 for n, t in zip(names, model.inputs, strict=True)]

    @tf.function(input_signature=signature)
    def call(*args: Any) -> Any:
        return model(list(args) if len(args) > 1 else args[0], training=False)

    return [call.get_concrete_function()]


def _source(framework: str, model_dir: Path, entries: list[tuple[str | None, dict[str, Any]]],
            options: CompilerOptions) -> tuple[Any, str, list[str], str]:
    """(what ct.convert takes, coremltools source, model files, framework version)."""
    if framework == "PYTORCH":
        import torch

        files = find_model_files(model_dir, (".pt2", ".pt", ".pth"), "PYTORCH",
                                 "Save the model as TorchScript: torch.jit.trace(model, args).save('model.pt').")
        if len(files) > 1:
            raise ClientError(f"the archive contains several PyTorch model files {[f.name for f in files]}; "
                              "include exactly one")
        if not entries:
            raise ClientError("the coreml target needs DataInputConfig for PyTorch models, for example "
                              "[{\"shape\": [1, 3, 224, 224]}] or {\"input0\": {\"shape\": [1, 3, 224, 224]}}")
        model, kind = _torch_source(files[0], entries)
        return model, "pytorch", [str(files[0].relative_to(model_dir))], \
            f"torch {torch.__version__.split('+')[0]} ({kind})"
    import tensorflow as tf

    if framework == "KERAS":
        import keras

        files = find_model_files(model_dir, (".keras", ".h5", ".hdf5"), "KERAS",
                                 "Save the model with model.save('model.keras') and put that file in the archive.")
        if len(files) > 1:
            raise ClientError(f"the archive contains several Keras models {[f.name for f in files]}; include one")
        return _keras_source(files[0]), "tensorflow", [str(files[0].relative_to(model_dir))], \
            f"keras {keras.__version__}, tensorflow {tf.__version__}"
    files = find_model_files(model_dir, (".pb",), "TENSORFLOW",
                             "Upload a SavedModel directory or a frozen graph .pb in the archive.")
    saved = [f.parent for f in files if f.name == "saved_model.pb"]
    if len(saved) > 1 or (not saved and len(files) > 1):
        raise ClientError(f"the archive contains several TensorFlow models {[str(f.relative_to(model_dir)) for f in files]}"
                          "; include exactly one SavedModel or frozen graph")
    if saved:
        key = options.signature_def_key or "serving_default"
        loaded = tf.saved_model.load(str(saved[0]))
        signatures = dict(getattr(loaded, "signatures", {}) or {})
        if key not in signatures:
            raise ClientError(f"the SavedModel has no signature '{key}' (it has {sorted(signatures)})")
        return [signatures[key]], "tensorflow", [str((saved[0] / "saved_model.pb").relative_to(model_dir))], \
            f"tensorflow {tf.__version__}"
    return str(files[0]), "tensorflow", [str(files[0].relative_to(model_dir))], f"tensorflow {tf.__version__}"


def _labels(model_dir: Path, options: CompilerOptions) -> tuple[list[str] | None, Path | None]:
    path = class_labels(model_dir, options.class_labels)
    if path is None:
        return None, None
    labels = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if not labels:
        raise ClientError(f"the class_labels file '{options.class_labels}' holds no labels (one label per line)")
    return labels, path


def feature_specs(features: Any) -> list[dict[str, Any]]:
    """Inputs or outputs of a Core ML model description, as JSON (name, type, shapes, flexibility)."""
    out = []
    for f in features:
        kind = f.type.WhichOneof("Type")
        item: dict[str, Any] = {"name": f.name}
        if kind == "multiArrayType":
            t = f.type.multiArrayType
            item.update(type="Tensor", dtype=_MULTIARRAY_DTYPES.get(t.dataType, str(t.dataType)),
                        shape=[int(d) for d in t.shape])
            if t.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
                item["enumerated_shapes"] = [[int(d) for d in s.shape] for s in t.enumeratedShapes.shapes]
            elif t.WhichOneof("ShapeFlexibility") == "shapeRange":
                item["shape_range"] = [[int(r.lowerBound), int(r.upperBound)] for r in t.shapeRange.sizeRanges]
        elif kind == "imageType":
            t = f.type.imageType
            item.update(type="Image", dtype="uint8", color_space=t.ColorSpace.Name(t.colorSpace),
                        width=int(t.width), height=int(t.height))
            if t.WhichOneof("SizeFlexibility") == "enumeratedSizes":
                item["enumerated_sizes"] = [[int(s.height), int(s.width)] for s in t.enumeratedSizes.sizes]
            elif t.WhichOneof("SizeFlexibility") == "imageSizeRange":
                r = t.imageSizeRange
                item["size_range"] = {"height": [int(r.heightRange.lowerBound), int(r.heightRange.upperBound)],
                                      "width": [int(r.widthRange.lowerBound), int(r.widthRange.upperBound)]}
        elif kind == "stringType":
            item.update(type="String", dtype="str", shape=[])
        elif kind == "int64Type":
            item.update(type="Int64", dtype="int64", shape=[])
        elif kind == "dictionaryType":
            key = f.type.dictionaryType.WhichOneof("KeyType")
            item.update(type="Dictionary", dtype=f"dict[{'str' if key == 'stringKeyType' else 'int64'}, float64]",
                        shape=[])
        else:
            item.update(type=str(kind), dtype=str(kind), shape=[])
        out.append(item)
    return out


def _tensor_spec(item: dict[str, Any], channel_last: bool) -> TensorSpec:
    """The runtime's TensorSpec for a feature (images as [1, C, H, W] or [1, H, W, C] uint8, flexible dims -1)."""
    if item["type"] == "Image":
        c = 1 if item["color_space"] == "GRAYSCALE" else 3
        flexible = "enumerated_sizes" in item or "size_range" in item
        h, w = (-1, -1) if flexible else (item["height"], item["width"])
        return TensorSpec(item["name"], (1, h, w, c) if channel_last else (1, c, h, w), "uint8")
    shape = list(item.get("shape", []))
    if "enumerated_shapes" in item:
        shapes = item["enumerated_shapes"]
        shape = [d if all(s[i] == d for s in shapes) else -1 for i, d in enumerate(shapes[0])]
    elif "shape_range" in item:
        shape = [lo if lo == hi else -1 for lo, hi in item["shape_range"]]
    return TensorSpec(item["name"], tuple(shape), item["dtype"])


def compile(request: CompileRequest) -> BuildResult:
    """Convert the archive's model to ``out_dir/model.mlpackage`` (Core ML's own DataInputConfig form)."""
    framework, model_dir, options, target = request.framework.upper(), request.model_dir, request.options, request.target
    data_input_config, out_dir = request.data_input_config, request.out_dir
    try:
        import coremltools as ct
    except ImportError:
        raise ServerError("coremltools is missing from this compiler image") from None
    entries = coreml_inputs(data_input_config, framework, target)
    channel_last = framework != "PYTORCH"
    source, ct_source, model_files, version = _source(framework, model_dir, entries, options)
    labels, labels_path = _labels(model_dir, options)
    inputs = _input_types(ct, entries, channel_last) if entries else None
    kwargs: dict[str, Any] = {"source": ct_source, "convert_to": "mlprogram"}
    if inputs:
        kwargs["inputs"] = inputs
    if labels:
        kwargs["classifier_config"] = ct.ClassifierConfig(labels)
    if framework == "TENSORFLOW" and options.output_names and isinstance(source, str):
        kwargs["outputs"] = [_canon(n) for n in options.output_names]
    try:
        with request.stage("build"):
            mlmodel = ct.convert(source, **kwargs)
    except ClientError:
        raise
    except Exception as exc:
        log.exception("coremltools conversion failed")
        raise ClientError(f"coremltools {ct.__version__} could not convert the {framework} model: {_first_line(exc)}. "
                          "Check DataInputConfig (names, shapes in the model's layout) and, with class_labels, that "
                          "the model has one probability vector output with one entry per label") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    pkg = out_dir / PACKAGE_NAME
    if pkg.exists():
        shutil.rmtree(pkg)
    mlmodel.save(str(pkg))
    spec = mlmodel.get_spec()
    ins, outs = feature_specs(spec.description.input), feature_specs(spec.description.output)
    info = {
        "package": PACKAGE_NAME,
        "model_type": spec.WhichOneof("Type"),
        "specification_version": int(spec.specificationVersion),
        "minimum_deployment_target": "iOS15 / macOS12",
        "compute_precision": "float16",
        "coremltools": ct.__version__,
        "inputs": ins,
        "outputs": outs,
        "classifier": {"labels": len(labels), "predicted_feature": spec.description.predictedFeatureName,
                       "probabilities": spec.description.predictedProbabilitiesName} if labels else None,
        "declared_inputs": [{"name": n, **d} for n, d in entries],
    }
    model = LoadedModel(
        framework=framework, framework_version=version, kind="coreml",
        inputs=[_tensor_spec(i, channel_last) for i in ins], outputs=[_tensor_spec(o, channel_last) for o in outs],
        model_files=model_files, extra={"coreml": info, "labels": labels_path},
    )
    return BuildResult(model=model, files=[pkg], library=PACKAGE_NAME, runtime="coreml")
