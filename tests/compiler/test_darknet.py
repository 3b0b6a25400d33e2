"""DARKNET: a tiny-YOLO-like network written as .cfg + .weights (Darknet's binary format), compiled through
the Darknet -> ONNX converter and TVM, against a torch implementation of Darknet's layer semantics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kiln.runtime
import numpy as np
import pytest
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import compile_artifact

torch = pytest.importorskip("torch")
F = torch.nn.functional

CLASSES, ANCHORS = 2, 3
HEAD = ANCHORS * (5 + CLASSES)
# (section, options) after [net]; indices in comments are Darknet layer numbers
LAYERS: list[tuple[str, dict[str, Any]]] = [
    ("convolutional", {"batch_normalize": 1, "filters": 8, "size": 3, "stride": 1, "pad": 1, "activation": "leaky"}),
    ("maxpool", {"size": 2, "stride": 2}),  # 1: 32 -> 16
    ("convolutional", {"batch_normalize": 1, "filters": 16, "size": 3, "stride": 2, "pad": 1, "activation": "mish"}),
    ("maxpool", {"size": 2, "stride": 1}),  # 3: Darknet pads one column/row at the end: 8 -> 8
    ("convolutional", {"batch_normalize": 1, "filters": 8, "size": 1, "stride": 1, "pad": 1, "activation": "leaky"}),
    ("convolutional", {"batch_normalize": 1, "filters": 16, "size": 3, "stride": 1, "pad": 1, "groups": 2,
                       "activation": "leaky"}),
    ("shortcut", {"from": -4, "activation": "linear"}),  # 6: + layer 2
    ("route", {"layers": -1, "groups": 2, "group_id": 1}),  # 7: second half of the channels
    ("convolutional", {"filters": HEAD, "size": 1, "stride": 1, "pad": 1, "activation": "linear"}),
    ("yolo", {"mask": "0,1,2", "anchors": "10,14, 23,27, 37,58, 81,82, 135,169, 344,319", "classes": CLASSES,
              "num": 6}),
    ("route", {"layers": -4}),  # 10: layer 6
    ("convolutional", {"batch_normalize": 1, "filters": 8, "size": 1, "stride": 1, "pad": 1, "activation": "leaky"}),
    ("upsample", {"stride": 2}),  # 12: 8 -> 16
    ("route", {"layers": "-1, 1"}),  # 13: concat with layer 1 (16x16)
    ("convolutional", {"filters": HEAD, "size": 1, "stride": 1, "pad": 1, "activation": "linear"}),
    ("yolo", {"mask": "3,4,5", "anchors": "10,14, 23,27, 37,58, 81,82, 135,169, 344,319", "classes": CLASSES,
              "num": 6, "scale_x_y": 1.05}),
]


def _cfg(width: int = 32, height: int = 32, layers: list[tuple[str, dict[str, Any]]] = LAYERS) -> str:
    parts = [f"[net]\n# a comment\nbatch=1\nwidth={width}\nheight={height}\nchannels=3\n"]
    parts += [f"[{kind}]\n" + "".join(f"{k}={v}\n" for k, v in opts.items()) for kind, opts in layers]
    return "\n".join(parts)


def _params(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Random parameters per convolutional layer (channel counts follow the network above)."""
    params, channels = [], {-1: 3}
    for i, (kind, o) in enumerate(LAYERS):
        c = channels[i - 1]
        if kind == "convolutional":
            n, k, g = o["filters"], o["size"], o.get("groups", 1)
            p = {"bias": rng.uniform(-0.2, 0.2, n), "weight": rng.standard_normal((n, c // g, k, k)) / np.sqrt(c * k * k)}
            if o.get("batch_normalize"):
                p.update(scale=rng.uniform(0.5, 1.5, n), mean=rng.uniform(-0.3, 0.3, n), var=rng.uniform(0.5, 2, n))
            params.append({k: v.astype(np.float32) for k, v in p.items()})
            channels[i] = n
        elif kind == "route":
            refs = [int(r) for r in str(o["layers"]).split(",")]
            channels[i] = sum(channels[r + i if r < 0 else r] for r in refs) // o.get("groups", 1)
        else:
            channels[i] = c
    return params


def _weights(params: list[dict[str, np.ndarray]]) -> bytes:
    """Darknet's .weights: major, minor, revision (int32), seen (int64 since 0.2), then float32 arrays."""
    blob = [np.array([0, 2, 5], "<i4").tobytes(), np.array([32013312], "<i8").tobytes()]
    for p in params:
        order = ["bias", "scale", "mean", "var", "weight"] if "scale" in p else ["bias", "weight"]
        blob += [p[k].astype("<f4").tobytes() for k in order]
    return b"".join(blob)


def _reference(x: np.ndarray, params: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Darknet's forward pass written directly in torch (batch norm unfolded, eps 1e-5)."""
    acts = {"linear": lambda t: t, "leaky": lambda t: F.leaky_relu(t, 0.1), "mish": F.mish}
    outs: list[Any] = []
    heads = []
    cur = torch.from_numpy(x)
    it = iter(params)
    for i, (kind, o) in enumerate(LAYERS):
        if kind == "convolutional":
            p = {k: torch.from_numpy(v) for k, v in next(it).items()}
            y = F.conv2d(cur, p["weight"], None, o["stride"], o["size"] // 2, 1, o.get("groups", 1))
            if "scale" in p:
                y = (y - p["mean"][:, None, None]) / torch.sqrt(p["var"][:, None, None] + 1e-5) * p["scale"][:, None, None]
            cur = acts[o["activation"]](y + p["bias"][:, None, None])
        elif kind == "maxpool":
            pad = o["size"] - 1
            cur = F.max_pool2d(F.pad(cur, (pad // 2, pad - pad // 2) * 2, value=-np.inf), o["size"], o["stride"])
        elif kind == "shortcut":
            cur = cur + outs[i + o["from"]]
        elif kind == "route":
            refs = [int(r) for r in str(o["layers"]).split(",")]
            cur = torch.cat([outs[r + i if r < 0 else r] for r in refs], 1)
            if o.get("groups", 1) > 1:
                cur = torch.chunk(cur, o["groups"], 1)[o["group_id"]]
        elif kind == "upsample":
            cur = cur.repeat_interleave(o["stride"], 2).repeat_interleave(o["stride"], 3)
        elif kind == "yolo":
            n, _, h, w = cur.shape
            grid = cur.reshape(n, ANCHORS, 5 + CLASSES, h, w).clone()
            s = o.get("scale_x_y", 1.0)
            grid[:, :, 0:2] = torch.sigmoid(grid[:, :, 0:2]) * s - (s - 1) / 2
            grid[:, :, 4:] = torch.sigmoid(grid[:, :, 4:])
            heads.append(grid.reshape(n, -1, h, w).numpy())
        outs.append(cur)
    return heads


@pytest.fixture(scope="module")
def darknet_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    params = _params(np.random.default_rng(0))
    d = tmp_path_factory.mktemp("darknet")
    (d / "yolo-tiny-test.cfg").write_text(_cfg())
    (d / "yolo-tiny-test.weights").write_bytes(_weights(params))
    return d, params


def _compile(model_dir: Path, config: str | None, out: Path) -> kiln.runtime.Model:
    return kiln.runtime.load(compile_artifact(model_dir, "DARKNET", "ml_c4", out, data_input_config=config))


@pytest.mark.parametrize("config", [None, '{"data": [1, 3, 64, 96]}'])
def test_tiny_yolo_compiles_and_matches_darknet_semantics(darknet_dir: tuple[Path, Any], config: str | None,
                                                           tmp_path: Path) -> None:
    # GIVEN a tiny-YOLO-like Darknet network (batch-normalised leaky/mish convs, grouped conv, both maxpool
    # paddings, shortcut, grouped route, upsample, concat route, two yolo heads) with random weights in
    # Darknet's binary format, at the cfg's size or at another size given in DataInputConfig
    model_dir, params = darknet_dir
    shape = (1, 3, 64, 96) if config else (1, 3, 32, 32)
    # WHEN it is compiled for ml_c4 and run through kiln.runtime
    model = _compile(model_dir, config, tmp_path)
    x = np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)
    got = model.run({"data": x})
    # THEN both yolo heads match the torch implementation of Darknet's layers
    expected = _reference(x, params)
    assert [s.name for s in model.outputs] == ["output_0", "output_1"]
    assert [o.shape for o in got] == [e.shape for e in expected] == [
        (1, HEAD, shape[2] // 4, shape[3] // 4), (1, HEAD, shape[2] // 2, shape[3] // 2)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("cfg", "weights", "message"), [
    (_cfg(layers=[*LAYERS[:2], ("region", {"classes": 2})]), None, r"\[region\] is not supported"),
    (_cfg(), b"\0" * 40, "ends early"),
    (_cfg(layers=LAYERS[:1]), None, "more values than the cfg"),
    ("[convolutional]\nfilters=1\n", None, "must start with a \\[net\\]"),
])
def test_bad_darknet_inputs_are_client_errors(darknet_dir: tuple[Path, Any], tmp_path: Path, cfg: str,
                                              weights: bytes | None, message: str) -> None:
    # GIVEN a cfg with an unsupported layer, a truncated .weights file, weights for a bigger network, or no [net]
    model_dir, _ = darknet_dir
    (tmp_path / "model.cfg").write_text(cfg)
    (tmp_path / "model.weights").write_bytes(weights or (model_dir / "yolo-tiny-test.weights").read_bytes())
    # WHEN it is loaded
    # THEN the error says what is wrong with the files
    with pytest.raises(ClientError, match=message):
        load_model("DARKNET", tmp_path, DataInputConfig(), CompilerOptions())
