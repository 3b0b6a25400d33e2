"""Semantic rules botocore's model cannot express, shared by the API and the compiler.

The API calls :func:`check_create` before accepting a job; the compiler parses the same
strings with :func:`parse_data_input_config` and :func:`parse_compiler_options`, so a job the
API accepted never fails later on a rule the API could have checked.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from kiln import isa
from kiln.catalog import (
    CUDA_ARCHS,
    CUDA_VERSION,
    TREE_FRAMEWORKS,
    UNAVAILABLE_FRAMEWORKS,
    Family,
    Target,
    TargetCatalog,
    UnsupportedTargetError,
)
from kiln.contract import raise_validation
from kiln.errors import ValidationError

# FrameworkVersion "is only supported for the MXNet, PyTorch, TensorFlow and TensorFlow Lite frameworks".
FRAMEWORK_VERSION_FRAMEWORKS = ("MXNET", "PYTORCH", "TENSORFLOW", "TFLITE")
# Frameworks whose DataInputConfig shapes are NHWC (the others are NCHW).
NHWC_FRAMEWORKS = ("TENSORFLOW", "TFLITE")
NO_INPUT_CONFIG_FRAMEWORKS = ("XGBOOST", "SKLEARN")
# Frameworks whose model files may hold pickles that run code; CompilerOptions allow_pickle opts in.
PICKLE_FRAMEWORKS = ("SKLEARN", "XGBOOST", "PYTORCH")
# Frameworks whose saved models do not record input shapes (MXNet symbols).
DATA_INPUT_CONFIG_REQUIRED = ("MXNET",)

# SageMaker's default limits for a compilation job where StoppingCondition leaves them out.
DEFAULT_MAX_RUNTIME_SECONDS = 900
DEFAULT_MAX_PENDING_SECONDS = 3600

# The most bytes one model input may take (shape x element size). Loaders allocate example inputs of
# the configured shape and TVM plans buffers from it, so a shape of terabytes is refused before any
# of that happens, at create and in the compiler alike.
MAX_INPUT_BYTES = 4 * 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1}

_DTYPES = {"float": "float32", "float32": "float32", "float16": "float16", "int64": "int64",
           "long": "int64", "int32": "int32", "int8": "int8", "uint8": "uint8"}
# CompilerOptions "precision": the arithmetic of convolutions and matrix products (fp32 by default).
PRECISIONS = ("fp32", "bf16")
# CompilerOptions "quantize" (quantize-by-calibration, ADR 0027): the member names, the data types Kiln
# quantizes to, the frameworks whose models Kiln holds as ONNX before compiling (onnxruntime quantizes
# them), and the caps on the calibration file (an .npz of representative inputs) the compiler reads.
QUANTIZE_MEMBER = "outputConfig.compilerOptions.quantize"
QUANTIZE_DTYPES = ("int8",)
QUANTIZE_FRAMEWORKS = ("ONNX",)
MAX_CALIBRATION_BYTES = 512 * 1024**2
MAX_CALIBRATION_SAMPLES = 1024
_S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/.+")
_GPU_CODE = re.compile(r"sm_\d{2,3}[a-z]?")
_VERSION = re.compile(r"\d+(\.\d+){0,3}")
_COREML_KEYS = {"shape", "default_shape", "type", "bias", "scale"}


@dataclass(frozen=True)
class InputSpec:
    """One model input named in DataInputConfig (name is None in PyTorch's list form)."""

    name: str | None
    shape: tuple[int, ...] | None = None
    coreml: dict[str, Any] = field(default_factory=dict)


class RuleError(ValueError):
    """A semantic rule failed; ``member`` is the wire path it concerns."""

    def __init__(self, member: str, message: str) -> None:
        super().__init__(message)
        self.member = member
        self.message = message


def parse_json_or_literal(text: str, member: str) -> Any:
    """JSON, or the Python-literal form AWS docs use (``{'mattr': ['+neon']}``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise RuleError(member, f"Value at '{member}' must be a JSON object, e.g. "
                                "{\"mcpu\": \"skylake-avx512\"}") from None


def parse_compiler_options(text: str | None, target: Target | None = None) -> dict[str, Any]:
    """Parse and check ``CompilerOptions``; keys are normalised (``gpu_code`` -> ``gpu-code``)."""
    member = "outputConfig.compilerOptions"
    if not text:
        options: dict[str, Any] = {}
    else:
        parsed = parse_json_or_literal(text, member)
        if not isinstance(parsed, dict):
            raise RuleError(member, f"Value at '{member}' must be a JSON object of compiler options")
        options = {("gpu-code" if k == "gpu_code" else "dtype" if k == "DTYPE" else k): v
                   for k, v in parsed.items()}
    known = {"mcpu", "mattr", "gpu-code", "cuda-ver", "trt-ver", "dtype", "ANDROID_PLATFORM",
             "class_labels", "signature_def_key", "output_names", "tuning", "allow_pickle", "precision",
             "quantize"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RuleError(member, f"Unknown compiler option(s) {', '.join(unknown)} at '{member}'; "
                                f"supported: {', '.join(sorted(known))}")
    _check_option_types(options, member)
    if target is not None:
        _check_options_for_target(options, target, member)
    return options


def _check_option_types(options: dict[str, Any], member: str) -> None:
    if "mcpu" in options and not (isinstance(options["mcpu"], str) and re.fullmatch(r"[\w.+-]+", options["mcpu"])):
        raise RuleError(member, f"'mcpu' at '{member}' must be a CPU name such as 'skylake-avx512'")
    if "mattr" in options:
        mattr = options["mattr"]
        if isinstance(mattr, str):
            mattr = [a for a in mattr.split(",") if a]
        if not (isinstance(mattr, list) and all(isinstance(a, str) and re.fullmatch(r"[+-][\w.]+", a) for a in mattr)):
            raise RuleError(member, f"'mattr' at '{member}' must be a list of CPU features such as ['+neon']")
        options["mattr"] = mattr
    if "gpu-code" in options and not (isinstance(options["gpu-code"], str) and _GPU_CODE.fullmatch(options["gpu-code"])):
        raise RuleError(member, f"'gpu-code' at '{member}' must name a CUDA architecture such as 'sm_75'")
    for key in ("cuda-ver", "trt-ver"):
        if key in options and not _VERSION.fullmatch(str(options[key])):
            raise RuleError(member, f"'{key}' at '{member}' must be a version such as '10.2'")
    if "dtype" in options:
        dtype = str(options["dtype"]).lower()
        if dtype not in _DTYPES:
            raise RuleError(member, f"'dtype' at '{member}' must be one of {', '.join(sorted(_DTYPES))}")
        options["dtype"] = _DTYPES[dtype]
    if "ANDROID_PLATFORM" in options:
        level = options["ANDROID_PLATFORM"]
        if isinstance(level, bool) or not isinstance(level, int) or not 21 <= level <= 29:
            raise RuleError(member, f"'ANDROID_PLATFORM' at '{member}' must be an API level from 21 to 29")
    if "class_labels" in options and not (isinstance(options["class_labels"], str) and options["class_labels"]
                                          and ".." not in options["class_labels"]):
        raise RuleError(member, f"'class_labels' at '{member}' must name a labels file inside the input archive")
    if "output_names" in options and not (isinstance(options["output_names"], list)
                                          and all(isinstance(n, str) for n in options["output_names"])):
        raise RuleError(member, f"'output_names' at '{member}' must be a list of tensor names")
    if "signature_def_key" in options and not (isinstance(options["signature_def_key"], str)
                                               and options["signature_def_key"]):
        raise RuleError(member, f"'signature_def_key' at '{member}' must be the name of a SavedModel signature")
    if "allow_pickle" in options and not isinstance(options["allow_pickle"], bool):
        raise RuleError(member, f"'allow_pickle' at '{member}' must be true or false")
    if "tuning" in options:
        _check_tuning(options["tuning"], member)
    if "precision" in options and options["precision"] not in PRECISIONS:
        raise RuleError(member, f"'precision' at '{member}' must be one of {', '.join(PRECISIONS)}")
    if "quantize" in options:
        _check_quantize(options["quantize"], options.get("precision", "fp32"))


def _check_quantize(quantize: Any, precision: Any) -> None:
    """``{"dtype": "int8", "calibration": "<archive path or s3://bucket/key>.npz"}``, each member named."""
    member = QUANTIZE_MEMBER
    if not isinstance(quantize, dict):
        raise RuleError(member, f"Value at '{member}' must be an object such as "
                                "{\"dtype\": \"int8\", \"calibration\": \"calibration.npz\"}")
    unknown = sorted(set(quantize) - {"dtype", "calibration"})
    if unknown:
        raise RuleError(member, f"Unknown member(s) {', '.join(map(str, unknown))} at '{member}'; "
                                "supported: calibration, dtype")
    dtype = quantize.get("dtype")
    if dtype not in QUANTIZE_DTYPES:
        raise RuleError(f"{member}.dtype", f"Value {json.dumps(dtype)} at '{member}.dtype' failed to satisfy "
                                           f"constraint: Member must be one of {', '.join(QUANTIZE_DTYPES)}")
    if "calibration" not in quantize:
        raise RuleError(f"{member}.calibration", f"Value null at '{member}.calibration' failed to satisfy "
                                                 "constraint: name the .npz of representative inputs, a file in "
                                                 "the model archive or an s3:// URI")
    check_calibration_location(quantize["calibration"])
    if precision != "fp32":
        raise RuleError(member, f"'{member}' and 'precision' {json.dumps(precision)} at 'outputConfig."
                                "compilerOptions' are mutually exclusive: int8 by calibration or bf16, not both")


def check_calibration_location(location: Any) -> None:
    """The calibration file: an ``.npz`` named relative to the model archive's root (no ``..``, not
    absolute), or an ``s3://bucket/key`` URI that the job's role reads."""
    member = f"{QUANTIZE_MEMBER}.calibration"
    if not isinstance(location, str) or not location.strip():
        raise RuleError(member, f"Value {json.dumps(location)} at '{member}' failed to satisfy constraint: "
                                "Member must be a file in the model archive or an s3:// URI")
    shown = location if len(location) <= 200 else location[:200] + "..."
    if len(location) > 1024:
        raise RuleError(member, f"Value '{shown}' at '{member}' failed to satisfy constraint: "
                                "Member must have length less than or equal to 1024")
    if location.startswith("s3://"):
        if not _S3_URI.fullmatch(location):
            raise RuleError(member, f"Value '{shown}' at '{member}' failed to satisfy constraint: Member must be "
                                    "an S3 URI of the form s3://bucket/key.npz")
    else:
        parts = location.replace("\\", "/").split("/")
        if (location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location) or ".." in parts
                or "://" in location or any(ord(c) < 32 for c in location)):
            raise RuleError(member, f"Value '{shown}' at '{member}' failed to satisfy constraint: Member must be "
                                    "a path relative to the model archive's root (no '..', not absolute) "
                                    "or an s3:// URI")
    if not location.lower().endswith(".npz"):
        raise RuleError(member, f"Value '{shown}' at '{member}' failed to satisfy constraint: the calibration "
                                "inputs must be an .npz file (numpy.savez: one array per model input, the "
                                "samples on the leading axis)")


# Tuning workers a job may fan out to (CompilerOptions {"tuning": {"workers": N}}, ADR 0023).
MAX_TUNING_WORKERS = 8


def _check_tuning(tuning: Any, member: str) -> None:
    if not isinstance(tuning, dict) or not set(tuning) <= {"trials", "minutes", "workers"} or not tuning:
        raise RuleError(member, f"'tuning' at '{member}' must be {{\"trials\": N}} and/or {{\"minutes\": M}}, "
                                f"optionally with {{\"workers\": W}}")
    if "workers" in tuning:
        workers = tuning["workers"]
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_TUNING_WORKERS:
            raise RuleError(member, f"'tuning.workers' at '{member}' must be an integer from 1 to "
                                    f"{MAX_TUNING_WORKERS}; got {json.dumps(workers)}")
        if not set(tuning) & {"trials", "minutes"}:
            raise RuleError(member, f"'tuning.workers' at '{member}' needs a budget: 'minutes' and/or 'trials'")
    for key, value in tuning.items():
        if key == "workers":
            continue
        kinds = int if key == "trials" else int | float
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            noun = "a positive integer" if key == "trials" else "a positive number"
            raise RuleError(member, f"'tuning.{key}' at '{member}' must be {noun}")


def _check_options_for_target(options: dict[str, Any], target: Target, member: str) -> None:
    if target.family is Family.CUDA and not target.cuda_arch and "gpu-code" not in options:
        raise RuleError(member, f"Target '{target.name}' needs 'gpu-code' (e.g. 'sm_75') in '{member}'")
    if target.family is Family.CUDA:
        check_cuda_arch(target, options.get("gpu-code"), member)
    if target.family is Family.COREML:
        extra = set(options) - {"class_labels"}
        if extra:
            raise RuleError(member, f"Target 'coreml' accepts only 'class_labels' at '{member}', "
                                    f"not {', '.join(sorted(extra))}")
    cpu = target.host if target.family is Family.CUDA else target.tvm_target
    if "mcpu" in options and cpu and target.family is not Family.CUDA:
        try:
            isa.cpu_features(str(cpu.get("mtriple", "")), options["mcpu"], options.get("mattr", []))
        except isa.UnknownCpuError as exc:
            raise RuleError(member, f"'mcpu' at '{member}': {exc}") from None
    if options.get("precision") == "bf16":
        _check_bf16_target(options, target, member)
    if "quantize" in options:
        _check_quantize_target(target)
    if target.family is not Family.CUDA:
        gpu = sorted(set(options) & {"gpu-code", "cuda-ver", "trt-ver"})
        if gpu:
            raise RuleError(member, f"Option(s) {', '.join(gpu)} at '{member}' apply only to NVIDIA targets, "
                                    f"not '{target.name}'")


def _check_bf16_target(options: dict[str, Any], target: Target, member: str) -> None:
    """bf16 compiles need a CPU target with native bf16 dot products (``kiln.isa.BF16_FEATURES``)."""
    cpu = target.tvm_target if target.family is not Family.CUDA else None
    if not cpu or cpu.get("kind") != "llvm":
        raise RuleError(member, f"'precision' 'bf16' at '{member}' applies only to CPU targets, not '{target.name}'")
    try:
        features = isa.cpu_features(str(cpu.get("mtriple", "")), options.get("mcpu") or cpu.get("mcpu"),
                                    [*cpu.get("mattr", []), *options.get("mattr", [])])
    except (isa.UnknownCpuError, ValueError):
        return  # the mcpu check above names the problem
    if not features.native_bf16:
        mcpu = options.get("mcpu") or cpu.get("mcpu") or "generic"
        raise RuleError(member, f"'precision' 'bf16' at '{member}': target '{target.name}' (mcpu '{mcpu}') has no "
                                f"native bf16 arithmetic ({' / '.join(isa.BF16_FEATURES)}); choose a CPU that has "
                                "it, e.g. mcpu 'znver4' or 'sapphirerapids' (x86) or 'neoverse-v1' (Graviton3)")


def _check_quantize_target(target: Target) -> None:
    """int8 by calibration needs Kiln's int8 path: the CPU (LLVM) pipeline (ADR 0018/0021)."""
    cpu = target.tvm_target if target.family not in (Family.CUDA, Family.COREML) else None
    if not cpu or cpu.get("kind") != "llvm":
        raise RuleError(QUANTIZE_MEMBER, f"'{QUANTIZE_MEMBER}' applies only to CPU targets: '{target.name}' has "
                                         "no int8 path in Kiln (integer convolutions are built for CPUs only)")


def check_quantize_framework(framework: str, options: dict[str, Any]) -> None:
    """Quantize-by-calibration works on models Kiln holds as ONNX (:data:`QUANTIZE_FRAMEWORKS`)."""
    if "quantize" in options and framework not in QUANTIZE_FRAMEWORKS:
        raise RuleError(QUANTIZE_MEMBER, f"'{QUANTIZE_MEMBER}' applies to {', '.join(QUANTIZE_FRAMEWORKS)} models, "
                                         f"not {framework}; quantize the model first (e.g. to a QDQ ONNX model) "
                                         "or compile it without 'quantize'")


def cuda_arch_supported(arch: str) -> bool:
    """Whether CUDA 13 (TVM 0.27's CUDA runtime) compiles for ``arch`` (``sm_90a`` -> 90)."""
    match = re.fullmatch(r"sm_(\d{2,3})[a-z]?", arch)
    return match is not None and int(match.group(1)) in CUDA_ARCHS


def check_cuda_arch(target: Target, gpu_code: str | None, options_member: str) -> None:
    """Refuse a GPU that TVM 0.27's CUDA runtime cannot build kernels for: the device's own
    (``outputConfig.targetDevice``) or CompilerOptions' ``gpu-code``."""
    supported = ", ".join(f"sm_{a}" for a in CUDA_ARCHS)
    why = (f"TVM 0.27 compiles CUDA kernels when the artifact loads, with CUDA {CUDA_VERSION}'s NVRTC, which "
           f"targets {supported} only (CUDA 13 dropped sm_50 to sm_72, CUDA 12 sm_37)")
    if target.cuda_arch and not cuda_arch_supported(target.cuda_arch):
        member = "outputConfig.targetDevice"
        raise RuleError(member, f"Value '{target.name}' at '{member}' failed to satisfy constraint: Target "
                                f"'{target.name}' has a {target.cuda_arch} GPU and its artifacts could not run: {why}")
    if gpu_code and not cuda_arch_supported(gpu_code):
        raise RuleError(options_member, f"Value '{gpu_code}' of 'gpu-code' at '{options_member}' failed to satisfy "
                                        f"constraint: artifacts for {gpu_code} could not run: {why}")


def input_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one tensor of ``shape`` and ``dtype`` (8 per element for a dtype not listed)."""
    return math.prod(shape) * DTYPE_BYTES.get(dtype, 8)


def check_input_size(shape: tuple[int, ...], dtype: str, where: str, member: str) -> None:
    """Refuse an input whose shape x element size exceeds :data:`MAX_INPUT_BYTES` (nothing is allocated)."""
    size = input_bytes(shape, dtype)
    if size > MAX_INPUT_BYTES:
        raise RuleError(member, f"Shape {list(shape)} at '{where}' takes {size} bytes as {dtype}; an input may "
                                f"take at most {MAX_INPUT_BYTES} bytes ({MAX_INPUT_BYTES // 1024**3} GiB)")


def parse_data_input_config(text: str | None, framework: str, target: Target | None = None,
                            dtype: str = "float32") -> list[InputSpec]:
    """Parse ``DataInputConfig`` in the form the framework takes (see the SageMaker reference);
    ``dtype`` (CompilerOptions') sizes each shape against :data:`MAX_INPUT_BYTES`."""
    member = "inputConfig.dataInputConfig"
    if text is None or text == "":
        return []
    if framework in NO_INPUT_CONFIG_FRAMEWORKS:
        # "XGBOOST: input data name and shape are not needed": tolerated, ignored.
        return []
    parsed = parse_json_or_literal(text, member)
    coreml = target is not None and target.family is Family.COREML
    if isinstance(parsed, list):
        if framework != "PYTORCH":
            raise RuleError(member, f"The list form of '{member}' is only for PYTORCH; {framework} needs "
                                    "a dictionary of input name to shape, e.g. {\"data\": [1, 3, 224, 224]}")
        if not parsed:
            raise RuleError(member, f"'{member}' must name at least one input")
        if all(isinstance(d, int) and not isinstance(d, bool) for d in parsed):
            parsed = [parsed]  # one bare shape: the list form of a single input
        return [_input_spec(None, item, member, coreml, f"{member}[{i}]", dtype) for i, item in enumerate(parsed)]
    if not isinstance(parsed, dict) or not parsed:
        raise RuleError(member, f"'{member}' must be a dictionary of input name to shape, e.g. "
                                "{\"data\": [1, 3, 224, 224]}")
    return [_input_spec(str(name), value, member, coreml, f"{member}.{name}", dtype)
            for name, value in parsed.items()]


def _input_spec(name: str | None, value: Any, member: str, coreml: bool, where: str, dtype: str) -> InputSpec:
    if coreml and isinstance(value, dict):
        return InputSpec(name=name, shape=None, coreml=_coreml_input(value, where, member, dtype))
    shape = _shape(value, where, member, dtype)
    return InputSpec(name=name, shape=shape)


def _shape(value: Any, where: str, member: str, dtype: str = "float32") -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)):
        raise RuleError(member, f"Shape at '{where}' must be a list of positive integers, e.g. [1, 3, 224, 224]; "
                                f"got {json.dumps(value)}")
    if len(value) > 8:
        raise RuleError(member, f"Shape at '{where}' has {len(value)} dimensions; at most 8 are supported")
    check_input_size(tuple(value), dtype, where, member)
    return tuple(value)


def _coreml_input(value: dict[str, Any], where: str, member: str, dtype: str) -> dict[str, Any]:
    unknown = set(value) - _COREML_KEYS
    if unknown:
        raise RuleError(member, f"Unknown CoreML input parameter(s) {', '.join(sorted(unknown))} at '{where}'; "
                                f"supported: {', '.join(sorted(_COREML_KEYS))}")
    if "shape" not in value:
        raise RuleError(member, f"CoreML input at '{where}' needs 'shape'")
    shape = value["shape"]
    if isinstance(shape, list) and shape and all(isinstance(s, list) for s in shape):
        for s in shape:
            _shape(s, f"{where}.shape", member, dtype)
    elif not (isinstance(shape, list) and shape and all(
            (isinstance(d, int) and d > 0) or (isinstance(d, str) and re.fullmatch(r"\d+\.\.(\d+|-1)", d))
            for d in shape)):
        raise RuleError(member, f"'shape' at '{where}' must be a shape, a list of shapes, or use ranges "
                                "such as \"1..10\"")
    if "default_shape" in value:
        _shape(value["default_shape"], f"{where}.default_shape", member, dtype)
    kind = value.get("type", "Tensor")
    if kind not in ("Image", "Tensor"):
        raise RuleError(member, f"'type' at '{where}' must be 'Image' or 'Tensor'")
    if kind == "Image":
        bias = value.get("bias")
        if bias is not None and not (isinstance(bias, list) and all(isinstance(b, int | float) for b in bias)):
            raise RuleError(member, f"'bias' at '{where}' must be a list of numbers")
        scale = value.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            raise RuleError(member, f"'scale' at '{where}' must be a number")
    elif "bias" in value or "scale" in value:
        raise RuleError(member, f"'bias' and 'scale' at '{where}' apply only to inputs of type 'Image'")
    return dict(value)


def check_create(request: dict[str, Any], catalog: TargetCatalog) -> Target:
    """Apply every semantic rule to a CreateCompilationJob request; the job's target when valid."""
    errors: list[str] = []
    has_input = request.get("InputConfig") is not None
    has_package = request.get("ModelPackageVersionArn") is not None
    if has_input == has_package:
        errors.append("Exactly one of 'inputConfig' and 'modelPackageVersionArn' must be provided")
    output = request.get("OutputConfig") or {}
    has_device = output.get("TargetDevice") is not None
    has_platform = output.get("TargetPlatform") is not None
    if has_device == has_platform:
        errors.append("Exactly one of 'outputConfig.targetDevice' and 'outputConfig.targetPlatform' must be provided")
    if not output.get("S3OutputLocation", "").startswith("s3://") or len(output["S3OutputLocation"]) <= 5:
        errors.append(f"Value '{output.get('S3OutputLocation')}' at 'outputConfig.s3OutputLocation' failed to "
                      "satisfy constraint: Member must be an S3 URI such as s3://bucket/prefix")
    raise_validation(errors)

    try:
        target = catalog.for_output_config(output)
    except UnsupportedTargetError as exc:
        member = "outputConfig.targetDevice" if has_device else "outputConfig.targetPlatform"
        raise ValidationError(f"1 validation error detected: Value '{exc.target}' at '{member}' failed to "
                              f"satisfy constraint: {exc}") from None

    try:
        options = parse_compiler_options(output.get("CompilerOptions"), target)
        if has_input:
            _check_input_config(request["InputConfig"], target, options)
    except RuleError as exc:
        raise_validation([exc.message])
    return target


def check_framework_target(framework: str, target: Target, options: dict[str, Any] | None = None) -> None:
    """Refuse frameworks and framework x target pairs this deployment cannot compile."""
    if framework in UNAVAILABLE_FRAMEWORKS:
        raise RuleError("inputConfig.framework",
                        f"Value '{framework}' at 'inputConfig.framework' failed to satisfy constraint: "
                        f"Framework {framework} is not supported by this deployment: {UNAVAILABLE_FRAMEWORKS[framework]}")
    if framework not in target.frameworks:
        raise RuleError("inputConfig.framework",
                        f"Value '{framework}' at 'inputConfig.framework' failed to satisfy constraint: "
                        f"Framework {framework} cannot be compiled for target '{target.name}'; "
                        f"'{target.name}' supports {', '.join(target.frameworks)}")
    untuned = framework in TREE_FRAMEWORKS or target.family in (Family.CUDA, Family.COREML)
    if untuned and tuning_workers(options) > 1:
        raise RuleError("outputConfig.compilerOptions",
                        "'tuning.workers' at 'outputConfig.compilerOptions' applies only to neural networks built "
                        f"for CPU targets; {framework} for '{target.name}' is not tuned")


def tuning_workers(options: dict[str, Any] | None) -> int:
    """How many tuning workers the job's (checked) CompilerOptions ask for: 1 unless ``tuning.workers`` says more.

    The service fans a job out when this is above 1, and the compiler gathers the workers' records then."""
    tuning = (options or {}).get("tuning")
    return int(tuning.get("workers", 1)) if isinstance(tuning, dict) else 1


def _check_input_config(config: dict[str, Any], target: Target, options: dict[str, Any]) -> None:
    framework = config["Framework"]
    uri = config["S3Uri"]
    if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/.+", uri):
        raise RuleError("inputConfig.s3Uri", f"Value '{uri}' at 'inputConfig.s3Uri' failed to satisfy constraint: "
                                             "Member must be an S3 URI of the form s3://bucket/key.tar.gz")
    if not uri.endswith(".tar.gz"):
        raise RuleError("inputConfig.s3Uri", f"Value '{uri}' at 'inputConfig.s3Uri' failed to satisfy constraint: "
                                             "Member must point to a single gzip compressed tar archive "
                                             "(.tar.gz suffix)")
    version = config.get("FrameworkVersion")
    if version is not None:
        if framework not in FRAMEWORK_VERSION_FRAMEWORKS:
            raise RuleError("inputConfig.frameworkVersion",
                            f"'inputConfig.frameworkVersion' is only supported for "
                            f"{', '.join(FRAMEWORK_VERSION_FRAMEWORKS)}, not {framework}; remove it")
        if not _VERSION.fullmatch(version):
            raise RuleError("inputConfig.frameworkVersion",
                            f"Value '{version}' at 'inputConfig.frameworkVersion' must be a version such as '2.4'")
    check_framework_target(framework, target, options)
    if framework in DATA_INPUT_CONFIG_REQUIRED and not config.get("DataInputConfig"):
        raise RuleError("inputConfig.dataInputConfig",
                        f"Value null at 'inputConfig.dataInputConfig' failed to satisfy constraint: {framework} models "
                        "do not carry their input shapes; give them, e.g. {\"data\": [1, 3, 224, 224]}")
    parse_data_input_config(config.get("DataInputConfig"), framework, target, options.get("dtype", "float32"))
    if options.get("precision") == "bf16" and framework in NO_INPUT_CONFIG_FRAMEWORKS:
        raise RuleError("outputConfig.compilerOptions",
                        "'precision' 'bf16' at 'outputConfig.compilerOptions' applies to neural networks, not "
                        f"{framework} tree models")
    check_quantize_framework(framework, options)
    if "allow_pickle" in options and framework not in PICKLE_FRAMEWORKS:
        raise RuleError("outputConfig.compilerOptions",
                        "'allow_pickle' at 'outputConfig.compilerOptions' applies only to "
                        f"{', '.join(PICKLE_FRAMEWORKS)} models")


def stopping_limits(stopping: dict[str, Any] | None) -> tuple[int, int]:
    """(MaxRuntimeInSeconds, MaxPendingTimeInSeconds) with SageMaker's defaults filled in."""
    stopping = stopping or {}
    return (int(stopping.get("MaxRuntimeInSeconds") or DEFAULT_MAX_RUNTIME_SECONDS),
            int(stopping.get("MaxPendingTimeInSeconds") or DEFAULT_MAX_PENDING_SECONDS))


def check_stopping_condition(stopping: dict[str, Any] | None) -> None:
    """``MaxWaitTimeInSeconds`` must be at least ``MaxRuntimeInSeconds`` (SageMaker's documented rule)."""
    stopping = stopping or {}
    wait, runtime = stopping.get("MaxWaitTimeInSeconds"), stopping.get("MaxRuntimeInSeconds")
    if wait is not None and runtime is not None and wait < runtime:
        raise_validation([f"Value {wait} at 'stoppingCondition.maxWaitTimeInSeconds' failed to satisfy constraint: "
                          f"Member must be greater than or equal to MaxRuntimeInSeconds ({runtime})"])


def check_tags(tags: list[dict[str, str]] | None, member: str = "tags") -> None:
    """Tag keys are unique per resource, and the ``aws:`` prefix is reserved."""
    if not tags:
        return
    errors: list[str] = []
    seen: set[str] = set()
    for index, tag in enumerate(tags, start=1):
        key = tag.get("Key", "")
        if key in seen:
            errors.append(f"Value '{key}' at '{member}.{index}.member.key' failed to satisfy constraint: "
                          "Tag keys must be unique per resource")
        if key.lower().startswith("aws:"):
            errors.append(f"Value '{key}' at '{member}.{index}.member.key' failed to satisfy constraint: "
                          "the 'aws:' prefix is reserved")
        seen.add(key)
    raise_validation(errors)
