"""XGBoost and scikit-learn tree ensembles through Treelite/TL2cgen."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import kiln.runtime
import numpy as np
import pytest
import skops.io as sio
import xgboost as xgb
from kiln.catalog import TargetCatalog
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from tests.compiler.conftest import EF_ARM_ABI_FLOAT_HARD, EM_AARCH64, EM_ARM, compile_artifact, elf_header

CATALOG = TargetCatalog()
# TL2cgen sums leaf values in float32 like XGBoost; sklearn averages in float64.
TOL = 1e-6


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_classification(n_samples=300, n_features=10, n_informative=6, random_state=0)
    return X.astype(np.float32), y


def _compile(model_dir: Path, framework: str, target: str, out: Path, options: str | None = None) -> Path:
    return compile_artifact(model_dir, framework, target, out, options=options)


@pytest.mark.parametrize("fmt", ["json", "ubj"])
def test_xgboost_matches_xgboost(tmp_path: Path, data: tuple[np.ndarray, np.ndarray], fmt: str) -> None:
    # GIVEN a trained XGBoost classifier saved as JSON / UBJSON
    X, y = data
    clf = xgb.XGBClassifier(n_estimators=20, max_depth=4).fit(X, y)
    (tmp_path / "m").mkdir()
    clf.get_booster().save_model(str(tmp_path / f"m/model.{fmt}"))
    # WHEN compiled for ml_c4 and run through kiln.runtime
    model = kiln.runtime.load(_compile(tmp_path / "m", "XGBOOST", "ml_c4", tmp_path))
    (out,) = model.run({"data": X})
    # THEN probabilities equal XGBoost's own
    np.testing.assert_allclose(out.reshape(len(X)), clf.predict_proba(X)[:, 1], rtol=TOL, atol=TOL)
    assert model.inputs[0].shape == (-1, 10) and model.manifest["runtime"] == "tl2cgen"


def test_sklearn_skops_matches_sklearn(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    # GIVEN a random forest saved with skops
    X, y = data
    rf = RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0).fit(X, y)
    (tmp_path / "m").mkdir()
    sio.dump(rf, tmp_path / "m/model.skops")
    # WHEN compiled for ml_c4 and run
    model = kiln.runtime.load(_compile(tmp_path / "m", "SKLEARN", "ml_c4", tmp_path))
    (out,) = model.run({"data": X})
    # THEN class probabilities equal sklearn's
    np.testing.assert_allclose(out.reshape(len(X), 2), rf.predict_proba(X), rtol=TOL, atol=TOL)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_never_loaded_without_opt_in(tmp_path: Path) -> None:
    # GIVEN a pickle that runs os.system when loaded
    marker = tmp_path / "pwned"
    (tmp_path / "m").mkdir()
    (tmp_path / "m/model.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    # WHEN SKLEARN and XGBOOST jobs load the archive without allow_pickle
    with pytest.raises(ClientError, match=r"pickle.*skops.*allow_pickle"):
        load_model("SKLEARN", tmp_path / "m", DataInputConfig(), CompilerOptions())
    with pytest.raises(ClientError, match="pickled models are not loaded"):
        load_model("XGBOOST", tmp_path / "m", DataInputConfig(), CompilerOptions())
    # THEN the payload never ran
    assert not marker.exists()
    # AND with the explicit opt-in it is loaded (proving the refusal was the only guard)
    with pytest.raises(ClientError):
        load_model("SKLEARN", tmp_path / "m", DataInputConfig(), CompilerOptions(allow_pickle=True))
    assert marker.exists()


def test_pickled_sklearn_with_opt_in(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    # GIVEN a joblib-pickled forest and CompilerOptions allow_pickle
    import joblib

    X, y = data
    rf = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=1).fit(X, y)
    (tmp_path / "m").mkdir()
    joblib.dump(rf, tmp_path / "m/model.joblib")
    # WHEN loaded
    loaded = load_model("SKLEARN", tmp_path / "m", DataInputConfig(),
                        CompilerOptions.parse('{"allow_pickle": true}'))
    # THEN it is a tree model with the forest's features
    assert loaded.kind == "tree" and loaded.inputs[0].shape == (-1, 10)


def test_skops_with_foreign_types_refused(tmp_path: Path) -> None:
    # GIVEN a skops file holding a non-sklearn object
    (tmp_path / "m").mkdir()
    sio.dump({"x": np.float32(1.0), "f": Path("/x")}, tmp_path / "m/model.skops")
    # WHEN loaded
    # THEN ClientError (nothing from outside sklearn/numpy is instantiated)
    with pytest.raises(ClientError, match=r"skops|cannot be compiled"):
        load_model("SKLEARN", tmp_path / "m", DataInputConfig(), CompilerOptions())


@pytest.mark.parametrize(("target", "elf_class", "machine"), [("ml_c6g", 2, EM_AARCH64), ("rasp3b", 1, EM_ARM)])
def test_tree_cross_builds(tmp_path: Path, data: tuple[np.ndarray, np.ndarray], target: str, elf_class: int,
                           machine: int) -> None:
    # GIVEN an XGBoost model
    X, y = data
    (tmp_path / "m").mkdir()
    xgb.XGBClassifier(n_estimators=5, max_depth=3).fit(X, y).get_booster().save_model(str(tmp_path / "m/m.json"))
    # WHEN compiled for an ARM target
    art = _compile(tmp_path / "m", "XGBOOST", target, tmp_path)
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    cls, mach, flags = elf_header(tmp_path / "x/model.so")
    # THEN the library is for that ARM flavour (hard-float for armv7)
    assert (cls, mach) == (elf_class, machine)
    if machine == EM_ARM:
        assert flags & EF_ARM_ABI_FLOAT_HARD


def test_tree_refused_for_gpu_target(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    # GIVEN an XGBoost model
    X, y = data
    (tmp_path / "m").mkdir()
    xgb.XGBClassifier(n_estimators=2).fit(X, y).get_booster().save_model(str(tmp_path / "m/m.json"))
    # WHEN compiled for a GPU target
    # THEN ClientError from the framework x target check
    with pytest.raises(ClientError, match="cannot be compiled for target 'ml_g4dn'"):
        _compile(tmp_path / "m", "XGBOOST", "ml_g4dn", tmp_path)
