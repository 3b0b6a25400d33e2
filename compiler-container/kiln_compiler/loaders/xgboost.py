"""XGBoost models (JSON / UBJSON) through Treelite."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files
from .trees import tree_specs

_HINT = "Save the model with booster.save_model('model.json') (or .ubj) and put that file in the archive."


def _is_xgboost_json(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return b'"learner"' in head or b'"version"' in head


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load an XGBoost model saved in JSON or UBJSON format."""
    import treelite

    candidates = find_model_files(model_dir, (".json", ".ubj", ".model", ".bst", ".pkl", ".pickle", ".joblib"),
                                  "XGBOOST", _HINT)
    safe = [p for p in candidates if p.suffix == ".ubj" or (p.suffix == ".json" and _is_xgboost_json(p))]
    if not safe:
        kinds = sorted({p.suffix for p in candidates})
        raise ClientError(
            f"only XGBoost JSON/UBJSON models are accepted (found {kinds}): legacy binary and pickled models "
            f"are not loaded. {_HINT}"
        )
    if len(safe) > 1:
        raise ClientError(f"the archive contains several XGBoost models {[p.name for p in safe]}; include one")
    path = safe[0]
    version = "unknown"
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            version = ".".join(str(v) for v in doc.get("version", [])) or version
            model = treelite.frontend.load_xgboost_model(str(path), format_choice="json")
        else:
            model = treelite.frontend.load_xgboost_model(str(path), format_choice="ubjson")
    except Exception as exc:
        raise ClientError(f"'{path.name}' is not a loadable XGBoost model ({str(exc).splitlines()[0][:300]}). "
                          f"{_HINT}") from None
    inputs, outputs = tree_specs(model, config, "XGBOOST")
    return LoadedModel(
        framework="XGBOOST",
        framework_version=f"xgboost {version}",
        kind="tree",
        inputs=inputs,
        outputs=outputs,
        model_files=[str(path.relative_to(model_dir))],
        tree_model=model,
    )
