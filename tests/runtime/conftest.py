"""Fixtures for kiln-runtime: small real artifacts compiled here (compile_artifact), and the platform wheels."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
import xgboost as xgb

from tests.compiler.conftest import compile_artifact, squeezenet, squeezenet_dir  # noqa: F401 - shared
from tests.conftest import tiny_onnx_model

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """A script under scripts/ imported as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def assets() -> ModuleType:
    """scripts/kiln_assets.py (wheels, emulation roots, tvm_ffi.dll)."""
    return load_script("kiln_assets")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive directory holding the tiny MatMul-Add-Relu ONNX model."""
    d = tmp_path_factory.mktemp("tiny")
    onnx.save(tiny_onnx_model(), str(d / "model.onnx"))
    return d


@pytest.fixture(scope="session")
def tiny_x86(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ONNX model compiled for ml_c4 (AVX2: runs on this host)."""
    return compile_artifact(tiny_model_dir, "ONNX", "ml_c4", tmp_path_factory.mktemp("tiny-c4"))


@pytest.fixture(scope="session")
def tree_x86(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """An XGBoost classifier compiled for ml_c4, with inputs (with a missing value) and XGBoost's probabilities."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 3] > 0).astype(int)
    clf = xgb.XGBClassifier(n_estimators=8, max_depth=3).fit(X, y)
    X[3, 0] = np.nan
    d = tmp_path_factory.mktemp("xgb")
    (d / "m").mkdir()
    clf.get_booster().save_model(str(d / "m/model.json"))
    return compile_artifact(d / "m", "XGBOOST", "ml_c4", d), X, clf.predict_proba(X)[:, 1]


@pytest.fixture(scope="session")
def wheels(assets: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kiln-runtime built for every platform (as `make wheels` does), platform tag -> wheel."""
    dist = tmp_path_factory.mktemp("dist")
    return {platform: assets.build_wheel(platform, dist) for platform in sorted(assets.PLATFORMS)}
