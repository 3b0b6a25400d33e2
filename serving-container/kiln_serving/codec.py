"""Request bodies to named input arrays, checked against the model's inputs; outputs to a response body.

Every refusal is a :class:`RequestError` with the HTTP status and a message that names the input
(or output) at fault and what the model takes. Nothing here knows about HTTP frameworks.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
REQUEST_TYPES = (NPY, NPZ, JSON, *IMAGE_TYPES)
RESPONSE_TYPES = (JSON, NPY, NPZ)
# The smallest derived body limit (an image may be sent larger than the tensor it becomes), the allowance
# per element for JSON text ("-0.12345678901234568, " is 22 characters) and for headers/containers.
MIN_BODY_LIMIT = 8 << 20
JSON_BYTES_PER_ELEMENT = 32
BODY_OVERHEAD = 64 << 10
# A model with dynamic dimensions has no size to derive a limit from.
DYNAMIC_BODY_LIMIT = 100 << 20
# Decoded image size cap (pixels): larger images are refused before they are decoded (decompression bombs).
MAX_IMAGE_PIXELS = 64 << 20


class Spec(Protocol):
    """A model input or output as the runtime describes it (kiln.runtime.TensorSpec)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...


class RequestError(Exception):
    """A request the model cannot take: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageOptions:
    """How image pixels become input values: ``pixel * scale + bias[channel]`` (Core ML's ImageType rule)."""

    scale: float = 1.0
    bias: tuple[float, ...] = ()


def describe(spec: Spec) -> str:
    """``name [1, 3, 224, 224] float32`` (-1 = any size)."""
    return f"{spec.name} {list(spec.shape)} {spec.dtype}"


def media_type(header: str | None) -> str:
    """The media type of a Content-Type header, lower-case, without parameters."""
    return (header or "").split(";", 1)[0].strip().lower()


def body_limit(inputs: Sequence[Spec], configured: int = 0) -> int:
    """The largest body a request may have: ``configured`` when set, else enough for the inputs as JSON."""
    if configured:
        return configured
    if any(d < 0 for spec in inputs for d in spec.shape):
        return DYNAMIC_BODY_LIMIT
    elements = sum(math.prod(spec.shape) for spec in inputs)
    return max(MIN_BODY_LIMIT, elements * JSON_BYTES_PER_ELEMENT + BODY_OVERHEAD)


def too_large(size: int, limit: int, inputs: Sequence[Spec]) -> RequestError:
    """The 413 for a body over the limit, naming the inputs it was sized for."""
    return RequestError(413, f"request body is {size} bytes; this model takes at most {limit} bytes "
                             f"(inputs: {'; '.join(describe(s) for s in inputs)}). Operators can raise the "
                             "limit with KILN_SERVING_MAX_REQUEST_BYTES")


# -- requests ------------------------------------------------------------------------------------------
def decode(content_type: str | None, body: bytes, inputs: Sequence[Spec], image: ImageOptions,
           limit: int) -> dict[str, np.ndarray]:
    """The named input arrays of a request, each checked against (and cast to) its spec; ``limit`` bounds
    what a compressed body (.npz) may inflate to."""
    kind = media_type(content_type)
    if kind == NPY:
        feeds = {_only_input(inputs, kind): _load_npy(body, _only_input(inputs, kind))}
    elif kind == NPZ:
        feeds = _load_npz(body, inputs, limit)
    elif kind == JSON:
        feeds = _load_json(body, inputs)
    elif kind in IMAGE_TYPES:
        spec = _image_input(inputs)
        feeds = {spec.name: _load_image(body, spec, image)}
    else:
        raise RequestError(415, f"Content-Type '{content_type or ''}' is not supported; send one of "
                                f"{', '.join(REQUEST_TYPES)}")
    return check_inputs(feeds, inputs)


def check_inputs(feeds: dict[str, Any], inputs: Sequence[Spec]) -> dict[str, np.ndarray]:
    """Every input present, none unknown, each of a castable dtype and the declared shape; cast to its dtype."""
    names = [s.name for s in inputs]
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise RequestError(400, f"unknown input(s) {unknown}; the model's inputs are "
                                f"{'; '.join(describe(s) for s in inputs)}")
    checked: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in feeds:
            raise RequestError(400, f"missing input '{spec.name}' ({describe(spec)})")
        checked[spec.name] = _check_array(np.asarray(feeds[spec.name]), spec)
    return checked


def _check_array(array: np.ndarray, spec: Spec) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, want, casting="same_kind"):
        raise RequestError(400, f"input '{spec.name}' has dtype {array.dtype}; the model takes {spec.dtype} "
                                f"({describe(spec)})")
    ok = array.ndim == len(spec.shape) and all(d < 0 or d == a for d, a in zip(spec.shape, array.shape, strict=True))
    if not ok:
        raise RequestError(400, f"input '{spec.name}' has shape {list(array.shape)}; the model expects "
                                f"{list(spec.shape)} (-1 = any size)")
    return np.ascontiguousarray(array, dtype=want)


def _only_input(inputs: Sequence[Spec], kind: str) -> str:
    if len(inputs) != 1:
        raise RequestError(400, f"{kind} carries one array but this model has {len(inputs)} inputs "
                                f"({', '.join(s.name for s in inputs)}); send {NPZ} or {JSON} with one entry per name")
    return inputs[0].name


def _load_npy(body: bytes, name: str) -> np.ndarray:
    try:
        array: np.ndarray = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(400, f"input '{name}': the body is not a valid .npy array ({_short(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise RequestError(400, f"input '{name}': the body is not a single .npy array")
    return array


def _load_npz(body: bytes, inputs: Sequence[Spec], limit: int) -> dict[str, Any]:
    # np.load on an .npz trusts each member's header: bound the inflated size first (a small zip can hold
    # gigabytes of zeros).
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
            if inflated > limit:
                raise RequestError(413, f"the .npz inflates to {inflated} bytes; this model's inputs "
                                        f"({'; '.join(describe(s) for s in inputs)}) take at most {limit}")
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except RequestError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise RequestError(400, f"the body is not a valid .npz archive ({_short(exc)}); it holds one .npy per "
                                f"input name ({', '.join(s.name for s in inputs)})") from None


def _load_json(body: bytes, inputs: Sequence[Spec]) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({_short(exc)})") from None
    if isinstance(document, dict):
        values = document
    elif isinstance(document, list) and len(inputs) == 1:
        values = {inputs[0].name: document}
    else:
        raise RequestError(400, "send a JSON object {\"<input name>\": nested list} (one entry per input: "
                                f"{', '.join(s.name for s in inputs)}), or a nested list for a one-input model")
    arrays = {}
    for name, value in values.items():
        try:
            arrays[str(name)] = np.asarray(value)
        except ValueError:
            raise RequestError(400, f"input '{name}' is not a rectangular nested list of numbers") from None
    return arrays


# -- images --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLayout:
    """Where an image input keeps its channels, and its pixel size (None = any)."""

    channels_first: bool
    channels: int
    height: int | None
    width: int | None


def image_layout(spec: Spec) -> ImageLayout | None:
    """The layout of an input that takes one image: 4-D, batch 1, 1 or 3 channels (NCHW, else NHWC)."""
    shape = spec.shape
    if len(shape) != 4 or shape[0] not in (1, -1) or np.dtype(spec.dtype).kind not in "uif":
        return None
    if shape[1] in (1, 3):
        return ImageLayout(True, shape[1], _size(shape[2]), _size(shape[3]))
    if shape[3] in (1, 3):
        return ImageLayout(False, shape[3], _size(shape[1]), _size(shape[2]))
    return None


def _size(dim: int) -> int | None:
    return dim if dim > 0 else None


def _image_input(inputs: Sequence[Spec]) -> Spec:
    images = [s for s in inputs if image_layout(s) is not None]
    if len(inputs) != 1 or not images:
        raise RequestError(415, "image requests need a model with one image input (4-D, batch 1, 1 or 3 channels, "
                                f"NCHW or NHWC); this model's inputs are {'; '.join(describe(s) for s in inputs)}. "
                                f"Send {NPY}, {NPZ} or {JSON}")
    return images[0]


def _load_image(body: bytes, spec: Spec, options: ImageOptions) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    layout = image_layout(spec)
    assert layout is not None  # _image_input chose it
    try:
        with Image.open(io.BytesIO(body)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise RequestError(413, f"input '{spec.name}': the image is {opened.width}x{opened.height} pixels; "
                                        f"at most {MAX_IMAGE_PIXELS} pixels are decoded")
            picture = opened.convert("RGB" if layout.channels == 3 else "L")
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(400, f"input '{spec.name}': the body is not a JPEG or PNG image ({_short(exc)})") from None
    size = (layout.width or picture.width, layout.height or picture.height)
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(picture, dtype=np.float32).reshape(size[1], size[0], layout.channels)
    if options.scale != 1.0 or options.bias:
        pixels = pixels * np.float32(options.scale) + np.asarray(options.bias or (0.0,), dtype=np.float32)
    if np.dtype(spec.dtype).kind in "ui":
        pixels = np.clip(np.rint(pixels), 0, 255)
    array = pixels.transpose(2, 0, 1) if layout.channels_first else pixels
    return array[np.newaxis].astype(spec.dtype)


# -- responses -----------------------------------------------------------------------------------------
def choose_response_type(accept: str | None) -> str:
    """The response encoding the Accept header asks for (JSON when it names none or anything)."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate((accept or "").split(",")):
        kind, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if kind:
            ranked.append((-quality, index, kind.lower()))
    if not ranked:
        return JSON
    for negative_quality, _, kind in sorted(ranked):
        if negative_quality == 0:
            break
        if kind in RESPONSE_TYPES:
            return kind
        if kind in ("*/*", "application/*"):
            return JSON
    raise RequestError(406, f"Accept '{accept}' names no encoding this server writes; use one of "
                            f"{', '.join(RESPONSE_TYPES)}")


def encode(outputs: Sequence[np.ndarray], specs: Sequence[Spec], kind: str) -> bytes:
    """The response body: ``{name: nested list}`` (JSON), one array (.npy) or one array per name (.npz)."""
    named = {spec.name: np.asarray(value) for spec, value in zip(specs, outputs, strict=True)}
    if kind == JSON:
        return json.dumps({name: value.tolist() for name, value in named.items()}).encode()
    buffer = io.BytesIO()
    if kind == NPY:
        if len(named) != 1:
            raise RequestError(406, f"{NPY} holds one array but this model has {len(named)} outputs "
                                    f"({', '.join(named)}); accept {NPZ} or {JSON}")
        np.save(buffer, next(iter(named.values())), allow_pickle=False)
    else:
        np.savez(buffer, allow_pickle=False, **named)
    return buffer.getvalue()


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
