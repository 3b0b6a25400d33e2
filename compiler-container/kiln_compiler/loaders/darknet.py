"""Darknet models (``.cfg`` + ``.weights``) converted to ONNX here, then the ONNX path.

Layers: ``[net]`` (input size), ``[convolutional]`` (groups, ``batch_normalize`` folded into the weights,
activations linear/leaky/relu/logistic/mish/swish), ``[maxpool]`` (Darknet's padding), ``[avgpool]``
(global), ``[route]`` (concatenation, and ``groups``/``group_id`` channel slices as in yolov4-tiny),
``[shortcut]`` (residual add), ``[upsample]`` (nearest), ``[dropout]`` (identity at inference) and
``[yolo]`` (a model output: the head's tensor with the logistic on x, y, objectness and class scores,
layout ``[1, anchors * (5 + classes), H, W]``; boxes are decoded by the caller as in Darknet).
Other sections are refused by name. DataInputConfig is NCHW (default: ``[net]``'s size, batch 1);
the input is called ``data`` unless DataInputConfig names it otherwise.

Weights file (AlexeyAB/pjreddie format): int32 major, minor, revision; ``seen`` as int64 when
major*10+minor >= 2, else int32; then float32 per convolutional layer: biases, [scales, rolling mean,
rolling variance when batch_normalize], weights [filters, channels/groups, size, size].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files

log = logging.getLogger(__name__)

_HINT = "Put the network's .cfg file and its trained .weights file in the archive."
BN_EPSILON = 1e-5  # Darknet (AlexeyAB) normalises with sqrt(variance + .00001)
LEAKY_SLOPE = 0.1


@dataclass
class Section:
    """One ``[section]`` of a .cfg file."""

    kind: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.options.get(key)
        if value is None:
            if default is None:
                raise ClientError(f"darknet cfg line {self.line}: [{self.kind}] needs '{key}'")
            return default
        try:
            return int(value)
        except ValueError:
            raise ClientError(f"darknet cfg line {self.line}: [{self.kind}] '{key}={value}' is not an integer") \
                from None

    def get_float(self, key: str, default: float) -> float:
        try:
            return float(self.options.get(key, default))
        except ValueError:
            raise ClientError(f"darknet cfg line {self.line}: [{self.kind}] '{key}' is not a number") from None

    def ints(self, key: str) -> list[int]:
        try:
            return [int(v) for v in self.options.get(key, "").split(",") if v.strip()]
        except ValueError:
            raise ClientError(f"darknet cfg line {self.line}: [{self.kind}] '{key}' must be a list of integers") \
                from None


def parse_cfg(text: str) -> list[Section]:
    """The sections of a Darknet .cfg, in order (comments and blank lines dropped)."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ClientError(f"darknet cfg line {number}: malformed section header '{line}'")
            sections.append(Section(line[1:-1].strip().lower(), line=number))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1].options[key.strip()] = value.strip()
        else:
            raise ClientError(f"darknet cfg line {number}: expected 'key=value' inside a section, got '{line}'")
    if not sections or sections[0].kind not in ("net", "network"):
        raise ClientError("the darknet cfg must start with a [net] section")
    return sections


class _Weights:
    """Sequential float32 reader over a .weights file."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 16:
            raise ClientError("the darknet .weights file is too short to hold its header")
        major, minor, _ = np.frombuffer(data[:12], "<i4")
        offset = 20 if (major * 10 + minor >= 2 and major < 1000 and minor < 1000) else 16
        self.values = np.frombuffer(data[offset:offset + (len(data) - offset) // 4 * 4], "<f4")
        self.pos = 0

    def take(self, count: int, what: str) -> np.ndarray:
        if self.pos + count > self.values.size:
            raise ClientError(f"the darknet .weights file ends early (at {what}): it does not belong to this cfg")
        out = self.values[self.pos:self.pos + count]
        self.pos += count
        return out.astype(np.float32)


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _activate(g: _Graph, x: str, kind: str, where: str) -> str:
    if kind == "linear":
        return x
    if kind == "leaky":
        return g.op("LeakyRelu", [x], "leaky", alpha=LEAKY_SLOPE)
    if kind == "relu":
        return g.op("Relu", [x], "relu")
    if kind == "logistic":
        return g.op("Sigmoid", [x], "logistic")
    if kind == "mish":
        return g.op("Mul", [x, g.op("Tanh", [g.op("Softplus", [x], "softplus")], "tanh")], "mish")
    if kind == "swish":
        return g.op("Mul", [x, g.op("Sigmoid", [x], "sigmoid")], "swish")
    raise ClientError(f"{where}: activation '{kind}' is not supported (linear, leaky, relu, logistic, mish, swish)")


def to_onnx(sections: list[Section], weights: bytes, shape: tuple[int, ...], input_name: str = "data") -> Any:
    """An ONNX model computing the Darknet network (float32, NCHW) for a fixed input ``shape``."""
    from onnx import TensorProto, helper

    g, reader = _Graph(), _Weights(weights)
    outs: list[tuple[str, int, int, int]] = []  # per layer: (tensor, channels, height, width)
    cur = (input_name, shape[1], shape[2], shape[3])
    yolo_outputs: list[tuple[str, tuple[int, ...]]] = []
    for index, sec in enumerate(sections[1:]):
        where = f"darknet cfg line {sec.line} [{sec.kind}] (layer {index})"
        x, c, h, w = cur
        if sec.kind in ("convolutional", "conv"):
            filters, size = sec.get_int("filters"), sec.get_int("size", 1)
            stride, groups = sec.get_int("stride", 1), sec.get_int("groups", 1)
            pad = size // 2 if sec.get_int("pad", 0) else sec.get_int("padding", 0)
            if c % groups or filters % groups:
                raise ClientError(f"{where}: groups={groups} must divide the channels ({c}) and filters ({filters})")
            bias = reader.take(filters, f"layer {index} biases")
            weight_count = filters * (c // groups) * size * size
            if sec.get_int("batch_normalize", 0):
                scales = reader.take(filters, f"layer {index} scales")
                mean = reader.take(filters, f"layer {index} rolling mean")
                var = reader.take(filters, f"layer {index} rolling variance")
                kernel = reader.take(weight_count, f"layer {index} weights").reshape(filters, c // groups, size, size)
                factor = scales / np.sqrt(var + BN_EPSILON)
                kernel = kernel * factor[:, None, None, None]
                bias = bias - mean * factor
            else:
                kernel = reader.take(weight_count, f"layer {index} weights").reshape(filters, c // groups, size, size)
            y = g.op("Conv", [x, g.const("w", kernel.astype(np.float32)), g.const("b", bias.astype(np.float32))],
                     "conv", kernel_shape=[size, size], strides=[stride, stride], pads=[pad] * 4, group=groups)
            cur = (_activate(g, y, sec.options.get("activation", "logistic"), where), filters,
                   (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1)
        elif sec.kind in ("maxpool", "max"):
            size = sec.get_int("size", sec.get_int("stride", 1))
            stride = sec.get_int("stride", 1)
            padding = sec.get_int("padding", size - 1)
            begin, end = padding // 2, padding - padding // 2
            y = g.op("MaxPool", [x], "maxpool", kernel_shape=[size, size], strides=[stride, stride],
                     pads=[begin, begin, end, end])
            cur = (y, c, (h + padding - size) // stride + 1, (w + padding - size) // stride + 1)
        elif sec.kind in ("avgpool", "avg"):
            cur = (g.op("GlobalAveragePool", [x], "avgpool"), c, 1, 1)
        elif sec.kind in ("dropout",):
            pass
        elif sec.kind == "route":
            refs = [r if r >= 0 else index + r for r in sec.ints("layers")]
            if not refs or any(not 0 <= r < index for r in refs):
                raise ClientError(f"{where}: layers={sec.options.get('layers')} must name earlier layers")
            srcs = [outs[r] for r in refs]
            if len({(s[2], s[3]) for s in srcs}) != 1:
                raise ClientError(f"{where}: the routed layers have different sizes {[(s[2], s[3]) for s in srcs]}")
            y = srcs[0][0] if len(srcs) == 1 else g.op("Concat", [s[0] for s in srcs], "route", axis=1)
            channels = sum(s[1] for s in srcs)
            groups, group_id = sec.get_int("groups", 1), sec.get_int("group_id", 0)
            if groups > 1:
                if channels % groups or not 0 <= group_id < groups:
                    raise ClientError(f"{where}: groups={groups}/group_id={group_id} do not split {channels} channels")
                part = channels // groups
                y = g.op("Slice", [y, g.const("start", np.array([group_id * part], np.int64)),
                                   g.const("end", np.array([(group_id + 1) * part], np.int64)),
                                   g.const("axis", np.array([1], np.int64))], "group")
                channels = part
            cur = (y, channels, srcs[0][2], srcs[0][3])
        elif sec.kind == "shortcut":
            ref = sec.get_int("from")
            src = outs[ref if ref >= 0 else index + ref]
            if src[1:] != (c, h, w):
                raise ClientError(f"{where}: from={ref} has shape {src[1:]} but the previous layer {(c, h, w)}")
            y = g.op("Add", [x, src[0]], "shortcut")
            cur = (_activate(g, y, sec.options.get("activation", "linear"), where), c, h, w)
        elif sec.kind == "upsample":
            stride = sec.get_int("stride", 2)
            factors = g.const("scales", np.array([1, 1, stride, stride], np.float32))
            y = g.op("Resize", [x, "", factors], "upsample", mode="nearest", nearest_mode="floor",
                     coordinate_transformation_mode="asymmetric")
            cur = (y, c, h * stride, w * stride)
        elif sec.kind == "yolo":
            classes = sec.get_int("classes", 20)
            anchors = len(sec.ints("mask")) or sec.get_int("num", 1)
            if c != anchors * (5 + classes):
                raise ClientError(f"{where}: the layer before has {c} channels, but {anchors} anchors x "
                                  f"(5 + {classes} classes) = {anchors * (5 + classes)} are needed")
            if sec.get_int("new_coords", 0):
                raise ClientError(f"{where}: new_coords=1 (scaled-yolov4 heads) is not supported")
            scale_xy = sec.get_float("scale_x_y", 1.0)
            # logistic on x, y, objectness and classes; w, h stay raw (Darknet's forward_yolo_layer)
            mask = np.ones((1, anchors, 5 + classes, 1, 1), np.float32)
            mask[:, :, 2:4] = 0
            grid = g.op("Reshape", [x, g.const("shape", np.array([1, anchors, 5 + classes, h, w], np.int64))],
                        "yolo_grid")
            sig = g.op("Sigmoid", [grid], "yolo_sigmoid")
            if scale_xy != 1.0:
                xy = np.zeros_like(mask)
                xy[:, :, 0:2] = 1
                affine = np.where(xy > 0, scale_xy, 1.0).astype(np.float32)
                offset = np.where(xy > 0, -(scale_xy - 1) / 2, 0.0).astype(np.float32)
                sig = g.op("Add", [g.op("Mul", [sig, g.const("sxy", affine)], "yolo_scale"),
                                   g.const("oxy", offset)], "yolo_offset")
            m = g.const("mask", mask)
            keep = g.op("Mul", [grid, g.const("raw", 1 - mask)], "yolo_raw")
            mixed = g.op("Add", [g.op("Mul", [sig, m], "yolo_act"), keep], "yolo_mix")
            y = g.op("Reshape", [mixed, g.const("shape", np.array([1, c, h, w], np.int64))], "yolo")
            yolo_outputs.append((y, (shape[0], c, h, w)))
        else:
            raise ClientError(f"{where}: Darknet layer type [{sec.kind}] is not supported; supported: convolutional, "
                              "maxpool, avgpool, route, shortcut, upsample, dropout, yolo")
        outs.append(cur)
    if reader.pos != reader.values.size:
        raise ClientError(f"the darknet .weights file holds {reader.values.size - reader.pos} more values than the "
                          "cfg's layers use: it does not belong to this cfg")
    if shape[0] != 1:
        raise ClientError("darknet models compile for batch 1: set the first dimension of DataInputConfig to 1")
    outputs = yolo_outputs or [(outs[-1][0], (shape[0], *outs[-1][1:]))]
    final = []
    for i, (name, out_shape) in enumerate(outputs):
        out = f"output_{i}" if yolo_outputs else "output"
        g.nodes.append(helper.make_node("Identity", [name], [out], name=out))
        final.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape)))
    graph = helper.make_graph(g.nodes, "darknet", [helper.make_tensor_value_info(
        input_name, TensorProto.FLOAT, list(shape))], final, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="kiln-darknet")


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Convert the archive's ``.cfg`` + ``.weights`` to ONNX and import it."""
    import onnx

    from .onnx import from_proto

    cfgs = find_model_files(model_dir, (".cfg",), "DARKNET", _HINT)
    weights = find_model_files(model_dir, (".weights",), "DARKNET", _HINT)
    if len(cfgs) > 1 or len(weights) > 1:
        raise ClientError(f"the archive must hold one .cfg and one .weights file; it holds "
                          f"{[f.name for f in cfgs + weights]}")
    sections = parse_cfg(cfgs[0].read_text(errors="replace"))
    net = sections[0]
    default = (1, net.get_int("channels", 3), net.get_int("height", 416), net.get_int("width", 416))
    given = list(config.by_name.items()) or [("data", s) for s in config.by_position]
    if len(given) > 1:
        raise ClientError(f"a darknet model has one input; DataInputConfig names {len(given)}")
    name, shape = given[0] if given else ("data", default)
    if len(shape) != 4 or shape[1] != default[1]:
        raise ClientError(f"DataInputConfig shape {list(shape)} for '{name}' must be NCHW with {default[1]} channels "
                          f"(the cfg's [net] gives {list(default)})")
    proto = to_onnx(sections, weights[0].read_bytes(), tuple(shape), name)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ClientError(f"the darknet network converts to an invalid ONNX model: {exc}") from None
    loaded = from_proto(proto, DataInputConfig(), framework="DARKNET", framework_version="darknet cfg/weights",
                        model_files=[str(cfgs[0].relative_to(model_dir)), str(weights[0].relative_to(model_dir))])
    loaded.extra["onnx"] = proto
    return loaded
