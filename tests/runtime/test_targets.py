"""The README's target table is the catalog's, and each of its ``native`` / ``emulated`` claims holds:
a network and a tree model compiled for that target run and give ONNX Runtime's / XGBoost's results."""

from __future__ import annotations

from pathlib import Path

import kiln_runtime
import numpy as np
import onnxruntime as ort
import pytest
import xgboost as xgb
from kiln import emulate
from kiln.catalog import TargetCatalog
from kiln.execution import Execution, rows

from tests.conftest import tiny_onnx_model
from tests.runtime.conftest import REPO, compile_artifact, load_script

RUNNABLE = [r for r in rows() if r.execution in (Execution.NATIVE, Execution.EMULATED)]
CI = {"ml_c4", "ml_c6g"}  # one per architecture in every run; the rest are slow


def test_readme_table_is_the_catalogs() -> None:
    # GIVEN the README and the catalog
    table = load_script("target_table")
    readme = (REPO / "README.md").read_text()
    # WHEN the table is rendered from the catalog
    # THEN the README already holds exactly that, with a row for every TargetDevice and TargetPlatform
    assert table.render(readme) == readme, "README.md's target table is stale: run scripts/target_table.py"
    catalog = TargetCatalog()
    names = {r.name for r in rows()}
    assert names == set(catalog.supported_devices) | set(catalog.supported_platforms)
    for name in names:
        assert f"| `{name}` |" in readme


def _target_arg(name: str) -> str:
    """A catalog key as compile_artifact takes it (TargetPlatform keys as OS:ARCH[:ACCELERATOR])."""
    if name not in TargetCatalog().supported_platforms:
        return name
    rest = name.removeprefix("LINUX_")
    return "LINUX:" + (rest.removesuffix("_NVIDIA") + ":NVIDIA" if rest.endswith("_NVIDIA") else rest)


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A small XGBoost classifier (JSON), rows to predict, and XGBoost's probabilities."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((16, 4)).astype(np.float32)
    clf = xgb.XGBClassifier(n_estimators=4, max_depth=2).fit(X, (X[:, 1] > 0).astype(int))
    d = tmp_path_factory.mktemp("tree")
    clf.get_booster().save_model(str(d / "model.json"))
    return d, X, clf.predict_proba(X)[:, 1]


@pytest.mark.parametrize("row", [r if r.name in CI else pytest.param(r, marks=pytest.mark.slow) for r in RUNNABLE],
                         ids=[r.name for r in RUNNABLE])
def test_target_runs_a_network_and_a_tree_model(row: object, tiny_model_dir: Path,
                                                tree_dir: tuple[Path, np.ndarray, np.ndarray],
                                                tmp_path: Path) -> None:
    name, how = row.name, row.execution  # type: ignore[attr-defined]
    # GIVEN the tiny network and a tree model compiled for the target
    network = compile_artifact(tiny_model_dir, "ONNX", _target_arg(name), tmp_path / "net")
    model_dir, features, probabilities = tree_dir
    trees = compile_artifact(model_dir, "XGBOOST", _target_arg(name), tmp_path / "tree")
    x = np.random.default_rng(4).standard_normal((1, 8)).astype(np.float32)
    # WHEN both run the way the table says (in process, or emulated)
    if how == Execution.NATIVE:
        try:
            (y,) = kiln_runtime.load(network).run({"x": x})
        except kiln_runtime.IncompatibleHostError as exc:
            pytest.skip(f"this host cannot run {name} natively: {exc}")
        (p,) = kiln_runtime.load(trees).run({"data": features})
    else:
        (y,) = emulate.run(network, {"x": x})
        (p,) = emulate.run(trees, {"data": features})
    # THEN they give ONNX Runtime's and XGBoost's results
    ref = ort.InferenceSession(tiny_onnx_model().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.reshape(-1), probabilities, rtol=1e-6, atol=1e-6)
