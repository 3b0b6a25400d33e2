"""A loaded artifact: ``load(path).run({name: array})``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .host import check_host
from .manifest import TensorSpec, extract, read_manifest
from .tvm_lib import Parallel


class Model:
    """A loaded artifact."""

    def __init__(self, root: Path, manifest: dict[str, Any],
                 keepalive: tempfile.TemporaryDirectory[str] | None = None, parallel: Parallel = "kiln") -> None:
        self.root = root
        self.manifest = manifest
        self.inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in manifest["outputs"]]
        self.class_labels: list[str] | None = None
        if manifest.get("class_labels"):
            self.class_labels = (root / manifest["class_labels"]).read_text().splitlines()
        self._keepalive = keepalive
        self._parallel = parallel
        self._impl: Any = None
        self._load()

    @property
    def runtime(self) -> str:
        """How the library runs: ``tvm-relax-vm``, ``tl2cgen`` or ``coreml``."""
        return str(self.manifest["runtime"])

    def _load(self) -> None:
        lib = self.root / self.manifest["library"]
        if self.runtime == "coreml":  # only reached on macOS (check_host), or with check=False
            import coremltools

            self._impl = coremltools.models.MLModel(str(lib))
        elif self.runtime == "tl2cgen":
            from .trees import TreePredictor

            self._impl = TreePredictor(lib)
        else:
            from .tvm_lib import RelaxVM

            self._impl = RelaxVM(lib, gpu=self.manifest["target"].get("family") == "cuda", parallel=self._parallel)

    def _check(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [s.name for s in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; the model's inputs are {names}")
        arrays = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ValueError(f"missing input '{spec.name}' (shape {list(spec.shape)}, {spec.dtype})")
            arr = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            ok = len(arr.shape) == len(spec.shape) and all(
                d < 0 or d == a for d, a in zip(spec.shape, arr.shape, strict=True))
            if not ok:
                raise ValueError(f"input '{spec.name}' has shape {list(arr.shape)}; the model expects "
                                 f"{list(spec.shape)} (-1 = any)")
            arrays.append(arr)
        return arrays

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on named inputs; returns the outputs in manifest order."""
        if self.runtime == "coreml":
            result = self._impl.predict(feeds)  # Image inputs take PIL images, as Core ML does
            return [result[o.name] for o in self.outputs]
        arrays = self._check(feeds)
        if self.runtime == "tl2cgen":
            return [self._impl.predict(arrays[0])]
        outputs: list[np.ndarray] = self._impl.run(arrays)
        return outputs


def load(path: str | os.PathLike[str], *, check: bool = True, parallel: Parallel = "kiln") -> Model:
    """Load an artifact directory or ``.tar.gz`` after checking that this host can run it.

    ``parallel``: the kernels' parallel loops on Kiln's launcher (``"kiln"``, where the artifact has one)
    or on TVM's own thread pool (``"tvm"``); both size themselves from ``TVM_NUM_THREADS`` (ADR 0032)."""
    p = Path(path)
    keepalive = None
    if p.is_file():
        keepalive = extract(p)
        p = Path(keepalive.name)
    manifest = read_manifest(p)
    if check:
        check_host(manifest)
    return Model(p, manifest, keepalive, parallel)
