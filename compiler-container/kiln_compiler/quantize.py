"""Quantize-by-calibration (ADR 0027): an fp32 model and an ``.npz`` of representative inputs in, a QDQ model out.

``CompilerOptions {"quantize": {"dtype": "int8", "calibration": "<archive path or s3://...>.npz"}}``: the
calibration file holds one array per model input (named like the input, the samples on the leading axis).
Kiln checks it against the model's inputs before reading any data (names, shapes, dtypes, the caps in
``kiln.rules``), quantizes the model with onnxruntime's ``quantize_static`` in the format the integer path
consumes (QDQ, per-channel symmetric s8 weights, u8 activations, MinMax ranges; ADR 0018/0021), and the
backend compiles the QDQ model like any other. After the build, the int8 executable and the fp32 model
(ONNX Runtime) run the first :data:`DEVIATION_SAMPLES` calibration samples; how far apart they are is the
job's ``precision`` record (the same figures as a bf16 build's, ``backends.deviation``).

Every problem with the calibration file is a ``ClientError`` naming
``outputConfig.compilerOptions.quantize.calibration``, with the file as the user named it.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kiln import rules
from kiln.runtime import TensorSpec

from .errors import ClientError
from .options import QuantizeOptions

log = logging.getLogger(__name__)

MEMBER = f"{rules.QUANTIZE_MEMBER}.calibration"
DEVIATION_SAMPLES = 16  # calibration samples the int8 build and the fp32 model both run for the record
CALIBRATION_STRIDE = 8  # samples whose intermediate tensors onnxruntime holds at once while calibrating
MIN_OPSET = 13  # per-channel DequantizeLinear needs its ``axis`` (opset 13)
MIN_IR_VERSION = 7  # the IR version of opset 13: initializers need not be graph inputs
METHOD = "onnxruntime quantize_static: QDQ, per-channel symmetric s8 weights, u8 activations, MinMax"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                      "MatMulInteger"})


def _error(message: str) -> ClientError:
    return ClientError(message, section="OutputConfiguration")


@dataclass(frozen=True)
class Calibration:
    """The representative inputs: ``arrays[name]`` holds ``samples`` inputs for the model input ``name``."""

    arrays: dict[str, np.ndarray]
    samples: int
    batched: dict[str, bool]  # True: arrays[name][i:i+1] is sample i (the input's batch axis is the sample axis)

    def feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """One input dict per sample (the first ``limit``), each shaped like the model's inputs."""
        for i in range(self.samples if limit is None else min(limit, self.samples)):
            yield {name: (a[i:i + 1] if self.batched[name] else a[i]) for name, a in self.arrays.items()}


def calibration_path(model_dir: Path, quantize: QuantizeOptions) -> Path:
    """The calibration file on this machine: fetched from S3 by the job, or a file inside the archive."""
    if quantize.fetched is not None:
        return quantize.fetched
    if quantize.calibration.startswith("s3://"):
        # compile_model called directly (not through a job): nobody read the object through a role
        raise _error(f"'{quantize.calibration}' at '{MEMBER}' is an S3 object; only a compilation job reads it "
                     "(through its RoleArn); compiling outside a job, name a file in the model archive")
    root = model_dir.resolve()
    path = model_dir / quantize.calibration
    try:
        path.resolve().relative_to(root)
    except ValueError:
        raise _error(f"'{quantize.calibration}' at '{MEMBER}' leads outside the model archive") from None
    if not path.is_file():
        present = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*.npz") if p.is_file())[:10]
        raise _error(f"the calibration file '{quantize.calibration}' named at '{MEMBER}' is not in the model "
                     f"archive (.npz files in it: {present or 'none'})")
    return path


def read_calibration(path: Path, inputs: list[TensorSpec], shown: str) -> Calibration:
    """Check the ``.npz`` at ``path`` against the model's ``inputs`` (headers first, then the data) and read it.

    ``shown`` is the file as the user named it (errors never show this machine's paths)."""
    where = f"the calibration file '{shown}' at '{MEMBER}'"
    size = path.stat().st_size
    if size > rules.MAX_CALIBRATION_BYTES:
        raise _error(f"{where} is {size} bytes; at most {rules.MAX_CALIBRATION_BYTES} are read")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise _error(f"{where} is not an .npz file (numpy.savez / savez_compressed writes one)") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        bad = sorted(n for n in members if not n.endswith(".npy"))
        if bad or not members:
            raise _error(f"{where} is not an .npz file: it holds {bad[:5] or 'nothing'} besides .npy arrays")
        unpacked = sum(info.file_size for info in members.values())
        if unpacked > rules.MAX_CALIBRATION_BYTES:
            raise _error(f"{where} unpacks to {unpacked} bytes; at most {rules.MAX_CALIBRATION_BYTES} are read")
        names = {n[:-len(".npy")]: n for n in members}
        wanted = [s.name for s in inputs]
        missing, extra = sorted(set(wanted) - set(names)), sorted(set(names) - set(wanted))
        if missing or extra:
            raise _error(f"{where} must hold one array per model input, named like it: the model's inputs are "
                         f"{wanted}; missing {missing}, not inputs {extra}")
        headers = {spec.name: _header(archive, names[spec.name], where) for spec in inputs}
        samples, batched = _check_shapes(inputs, headers, where)
        arrays = {}
        for spec in inputs:
            with archive.open(names[spec.name]) as member:
                try:
                    array = np.lib.format.read_array(member, allow_pickle=False)
                except (ValueError, OSError, EOFError) as exc:
                    raise _error(f"{where}: array '{spec.name}' cannot be read ({str(exc)[:200]})") from None
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise _error(f"{where}: array '{spec.name}' holds NaN or infinite values")
            arrays[spec.name] = array
    return Calibration(arrays=arrays, samples=samples, batched=batched)


def _header(archive: zipfile.ZipFile, name: str, where: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """(shape, dtype) from an .npy member's header, before its data is read."""
    key = name[:-len(".npy")]
    with archive.open(name) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise _error(f"{where}: '{key}' is not a numpy array ({str(exc)[:200]})") from None
    if dtype.hasobject:
        raise _error(f"{where}: array '{key}' holds Python objects; calibration inputs must be numbers")
    return tuple(int(d) for d in shape), dtype


def _check_shapes(inputs: list[TensorSpec], headers: dict[str, tuple[tuple[int, ...], np.dtype[Any]]],
                  where: str) -> tuple[int, dict[str, bool]]:
    """The sample count all arrays agree on, and per input whether its batch axis is the sample axis."""
    counts, batched = {}, {}
    for spec in inputs:
        shape, dtype = headers[spec.name]
        want = tuple(spec.shape)
        if dtype != np.dtype(spec.dtype):
            raise _error(f"{where}: array '{spec.name}' is {dtype}; the model's input '{spec.name}' takes {spec.dtype}")
        if len(shape) == len(want) + 1 and shape[1:] == want:
            batched[spec.name] = False
        elif want and want[0] == 1 and shape[1:] == want[1:] and len(shape) == len(want):
            batched[spec.name] = True  # [N, C, H, W] for an input [1, C, H, W]: sample i is [i:i+1]
        else:
            raise _error(f"{where}: array '{spec.name}' has shape {list(shape)}; the model's input '{spec.name}' "
                         f"is {list(want)}, so the array must be [samples, {', '.join(map(str, want))}]"
                         + (f" or [samples, {', '.join(map(str, want[1:]))}]" if want and want[0] == 1 else ""))
        counts[spec.name] = shape[0]
    if len(set(counts.values())) != 1:
        raise _error(f"{where}: the arrays hold different numbers of samples {counts}; every input needs one per sample")
    samples = next(iter(counts.values()))
    if not 1 <= samples <= rules.MAX_CALIBRATION_SAMPLES:
        raise _error(f"{where} holds {samples} samples; give 1 to {rules.MAX_CALIBRATION_SAMPLES}")
    return samples, batched


def is_quantized(model: Any) -> bool:
    """Whether an ONNX model already holds quantization operators (QDQ or QOperator)."""
    return any(node.op_type in _QDQ_OPS for node in model.graph.node)


def quantize_model(model: Any, calibration: Calibration, work: Path) -> Any:
    """``model`` (fp32 ONNX) quantized by onnxruntime's ``quantize_static`` on the calibration samples."""
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .backends.base import first_line

    if is_quantized(model):
        raise _error(f"the model is already quantized (it has quantization operators); remove "
                     f"'{rules.QUANTIZE_MEMBER}' to compile it as it is")
    if max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise _error(f"the model's opset could not be raised to {MIN_OPSET} for per-channel quantization "
                         f"({first_line(exc)})") from None
    samples = list(calibration.feeds())

    class Reader(CalibrationDataReader):
        """The samples in strides: onnxruntime reduces each stride to min/max before the next (bounded memory)."""

        def __init__(self) -> None:
            self.pending = iter(samples)

        def __len__(self) -> int:
            return len(samples)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(samples[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.pending, None)

    # the stride must divide the sample count (onnxruntime's rule); ranges are merged across strides
    stride = max(d for d in range(1, CALIBRATION_STRIDE + 1) if len(samples) % d == 0)

    work.mkdir(parents=True, exist_ok=True)
    fp32, qdq = work / "fp32.onnx", work / "qdq.onnx"
    large = model.ByteSize() > 1024**3  # protobuf caps one message at 2 GiB: keep the weights beside it
    onnx.save(model, str(fp32), save_as_external_data=large)
    try:
        quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=large,
                        extra_options={"CalibStridedMinMax": stride})
    except Exception as exc:
        log.exception("quantize_static failed")
        raise _error(f"onnxruntime could not quantize the model with the calibration inputs at '{MEMBER}': "
                     f"{first_line(exc)}") from None
    quantized = onnx.load(str(qdq))
    if quantized.ir_version < MIN_IR_VERSION:
        # quantize_static keeps an old model's IR version, under which every initializer must also be a graph
        # input; its scales and zero points are not: the IR version of opset 13 allows that
        quantized.ir_version = MIN_IR_VERSION
        onnx.save(quantized, str(qdq), save_as_external_data=large)
    return quantized


@dataclass
class Quantized:
    """A model quantized by calibration: the QDQ model loaded for the build, and what the record needs."""

    model: Any  # LoadedModel of the QDQ model
    fp32: Any  # the fp32 onnx.ModelProto (the deviation's reference)
    calibration: Calibration
    qdq_file: Path  # the QDQ model on disk (Kiln.Accuracy compares the artifact with ONNX Runtime on it)


def quantize_loaded(loaded: Any, model_dir: Path, quantize: QuantizeOptions, work: Path) -> Quantized:
    """Quantize a loaded model (its ONNX form in ``loaded.extra["onnx_model"]``) and load the QDQ model."""
    from .loaders.onnx import from_proto
    from .options import DataInputConfig

    fp32 = loaded.extra.pop("onnx_model", None)
    if fp32 is None or loaded.framework not in rules.QUANTIZE_FRAMEWORKS:
        raise _error(f"'{rules.QUANTIZE_MEMBER}' applies to {', '.join(rules.QUANTIZE_FRAMEWORKS)} models, "
                     f"not {loaded.framework}")
    calibration = read_calibration(calibration_path(model_dir, quantize), loaded.inputs, quantize.calibration)
    qdq = quantize_model(fp32, calibration, work)
    shapes = DataInputConfig(by_name={s.name: tuple(s.shape) for s in loaded.inputs})
    model = from_proto(qdq, shapes, framework=loaded.framework,
                       framework_version=f"{loaded.framework_version}, quantized to int8 by calibration",
                       model_files=loaded.model_files)
    model.extra.pop("onnx_model", None)
    return Quantized(model=model, fp32=fp32, calibration=calibration, qdq_file=work / "qdq.onnx")


def deviation(quantized: Quantized, executable: Any, tvm_target: dict[str, Any]) -> dict[str, Any]:
    """The ``precision`` record: the int8 executable vs the fp32 model (ONNX Runtime) on calibration samples."""
    import onnxruntime as ort

    from .backends import deviation as dev

    record: dict[str, Any] = {"dtype": "int8", "method": METHOD, "calibration_samples": quantized.calibration.samples}
    reason = dev.why_not_here(tvm_target)
    if reason:
        return {**record, **dev.not_measured("int8", reason.replace("from fp32", "from the fp32 model"))}
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(quantized.fp32.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        batches = list(quantized.calibration.feeds(DEVIATION_SAMPLES))
        got = [dev.run_executable(executable, quantized.model, feeds) for feeds in batches]
        want = [[np.asarray(o) for o in session.run(None, feeds)] for feeds in batches]
        figures = dev.compare(got, want)
    except Exception as exc:  # the record never fails a job that built
        log.exception("the int8 build's deviation from fp32 could not be measured")
        return {**record, **dev.not_measured("int8", f"the int8 build or the fp32 reference could not be run "
                                                     f"({type(exc).__name__})")}
    return {**record, "reference": f"fp32 model in onnxruntime {ort.__version__} (CPUExecutionProvider)",
            "measured": True, "samples": len(batches),
            "inputs": f"the first {len(batches)} of {quantized.calibration.samples} calibration samples", **figures}
