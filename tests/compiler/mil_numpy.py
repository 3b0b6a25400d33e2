"""A small numpy interpreter for Core ML ML Programs (MIL), for tests on Linux where Core ML cannot run.

It reads the saved ``.mlpackage`` back (spec protobuf + weight blobs, via coremltools' MIL proto loader)
and evaluates ``main`` op by op, honouring the program's dtypes (fp16 compute where the program casts to
fp16). It covers the ops that the test models convert to; any other op raises NotImplementedError, so a
test can never pass by skipping an op.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_, "int16": np.int16,
           "uint8": np.uint8, "int8": np.int8}


def load_program(mlpackage: Path) -> Any:
    """The pymil Program stored in an .mlpackage (weights read from its blob files)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(mlpackage), skip_model_load=True)
    spec = model.get_spec()
    return load(spec, spec.specificationVersion, model.weights_dir)


def _pad_same(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pads(op: dict[str, Any], spatial: tuple[int, ...], kernel: tuple[int, ...], strides: Any,
          dilations: Any) -> list[tuple[int, int]]:
    kind = op.get("pad_type", "valid")
    if kind == "custom":
        pad = [int(p) for p in op["pad"]]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if kind in ("same", "same_lower"):
        pads = [_pad_same(n, k, s, d) for n, k, s, d in zip(spatial, kernel, strides, dilations, strict=True)]
        return [(b, a) for a, b in pads] if kind == "same_lower" else pads
    return [(0, 0)] * len(spatial)


def _windows(x: np.ndarray, kernel: tuple[int, int], strides: Any, dilations: Any) -> np.ndarray:
    """[N, C, OH, OW, KH, KW] views of a padded NCHW array."""
    win = np.lib.stride_tricks.sliding_window_view(
        x, ((kernel[0] - 1) * dilations[0] + 1, (kernel[1] - 1) * dilations[1] + 1), axis=(2, 3))
    return win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]


def _conv(a: dict[str, Any]) -> np.ndarray:
    x, w = a["x"], a["weight"]
    groups = int(a.get("groups", 1))
    strides = [int(s) for s in a.get("strides", [1, 1])]
    dil = [int(d) for d in a.get("dilations", [1, 1])]
    kernel = (w.shape[2], w.shape[3])
    pads = _pads(a, x.shape[2:], kernel, strides, dil)
    xp = np.pad(x.astype(np.float32), [(0, 0), (0, 0), *pads])
    win = _windows(xp, kernel, strides, dil)  # N, C, OH, OW, KH, KW
    cin, cout = x.shape[1] // groups, w.shape[0] // groups
    outs = [np.einsum("nchwij,ocij->nohw", win[:, g * cin:(g + 1) * cin], w[g * cout:(g + 1) * cout].astype(np.float32))
            for g in range(groups)]
    out = np.concatenate(outs, axis=1)
    if a.get("bias") is not None:
        out = out + a["bias"].astype(np.float32).reshape(1, -1, 1, 1)
    return out.astype(x.dtype)


def _pool(a: dict[str, Any], reduce: Callable[..., np.ndarray], fill: float) -> np.ndarray:
    x = a["x"]
    kernel = tuple(int(k) for k in a["kernel_sizes"])
    strides = [int(s) for s in a["strides"]]
    pads = _pads(a, x.shape[2:], kernel, strides, [1, 1])
    xp = np.pad(x.astype(np.float32), [(0, 0), (0, 0), *pads], constant_values=fill)
    return reduce(_windows(xp, (kernel[0], kernel[1]), strides, [1, 1]), axis=(-2, -1)).astype(x.dtype)


def _axes(a: dict[str, Any]) -> tuple[int, ...] | None:
    axes = a.get("axes")
    return None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x.astype(np.float32) - x.astype(np.float32).max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


def _batch_norm(a: dict[str, Any]) -> np.ndarray:
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)  # MIL normalises over axis 1 (channels)

    def param(key: str, default: float) -> np.ndarray:
        return np.full(1, default, np.float32) if a.get(key) is None else a[key].astype(np.float32).reshape(shape)

    mean, var = a["mean"].astype(np.float32).reshape(shape), a["variance"].astype(np.float32).reshape(shape)
    eps = float(a.get("epsilon", 1e-5))
    y = (x.astype(np.float32) - mean) / np.sqrt(var + eps) * param("gamma", 1.0) + param("beta", 0.0)
    return y.astype(x.dtype)


_OPS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "cast": lambda a: a["x"].astype(_DTYPES[str(a["dtype"])]),
    "conv": _conv,
    "batch_norm": _batch_norm,
    "relu": lambda a: np.maximum(a["x"], 0).astype(a["x"].dtype),
    "relu6": lambda a: np.clip(a["x"], 0, 6).astype(a["x"].dtype),
    "sigmoid": lambda a: (1 / (1 + np.exp(-a["x"].astype(np.float32)))).astype(a["x"].dtype),
    "softmax": lambda a: _softmax(a["x"], int(a.get("axis", -1))),
    "add": lambda a: (a["x"] + a["y"]).astype(np.result_type(a["x"], a["y"])),
    "sub": lambda a: (a["x"] - a["y"]).astype(np.result_type(a["x"], a["y"])),
    "mul": lambda a: (a["x"] * a["y"]).astype(np.result_type(a["x"], a["y"])),
    "real_div": lambda a: (a["x"] / a["y"]).astype(np.result_type(a["x"], a["y"])),
    "linear": lambda a: (a["x"].astype(np.float32) @ a["weight"].astype(np.float32).T
                         + (0 if a.get("bias") is None else a["bias"].astype(np.float32))).astype(a["x"].dtype),
    "matmul": lambda a: (np.swapaxes(a["x"], -1, -2) if a.get("transpose_x") else a["x"]).astype(np.float32)
    @ (np.swapaxes(a["y"], -1, -2) if a.get("transpose_y") else a["y"]).astype(np.float32),
    "reshape": lambda a: a["x"].reshape([int(d) for d in a["shape"]]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "squeeze": lambda a: np.squeeze(a["x"], axis=_axes(a)),
    "expand_dims": lambda a: np.expand_dims(a["x"], axis=_axes(a)),
    "reduce_mean": lambda a: a["x"].astype(np.float32).mean(axis=_axes(a), keepdims=bool(a.get("keep_dims")))
    .astype(a["x"].dtype),
    "reduce_max": lambda a: a["x"].max(axis=_axes(a), keepdims=bool(a.get("keep_dims"))),
    "max_pool": lambda a: _pool(a, np.max, -np.inf),
    "avg_pool": lambda a: _pool(a, np.mean, 0.0),
    "identity": lambda a: a["x"],
}


def run(program: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Evaluate ``main`` on ``feeds``; returns every block output by name (``classify`` gives label + dict)."""
    main = program.functions["main"]
    env: dict[str, Any] = {}
    for name in main.inputs:
        env[name] = np.asarray(feeds[name], dtype=np.float32)  # image pixels too: the program takes fp32

    def value(var: Any) -> Any:
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return np.asarray(var.val) if not isinstance(var.val, str) else var.val
        raise KeyError(f"no value for {var.name}")

    for op in main.operations:
        if op.op_type == "const":
            continue
        args = {k: (tuple(value(v) for v in vs) if isinstance(vs, tuple | list) else value(vs))
                for k, vs in op.inputs.items()}
        if op.op_type == "classify":
            probs = np.asarray(args["probabilities"]).reshape(-1)
            classes = list(op.inputs["classes"].val)
            env[op.outputs[0].name] = classes[int(np.argmax(probs))]
            env[op.outputs[1].name] = dict(zip(classes, probs.astype(float).tolist(), strict=True))
            continue
        impl = _OPS.get(op.op_type)
        if impl is None:
            raise NotImplementedError(f"MIL op '{op.op_type}' is not implemented by this test interpreter")
        env[op.outputs[0].name] = impl(args)
    return {v.name: env[v.name] for v in main.outputs}
