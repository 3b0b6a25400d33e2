"""scikit-learn tree ensembles: skops files (safe), pickles only on explicit opt-in."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files
from .trees import tree_specs

log = logging.getLogger(__name__)
_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "builtins.", "collections.")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


def _load_skops(path: Path) -> Any:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=str(path))
    except Exception as exc:
        raise ClientError(f"'{path.name}' is not a valid skops file ({str(exc)[:300]})") from None
    foreign = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise ClientError(f"the skops file '{path.name}' references types outside scikit-learn/numpy {foreign}; "
                          "only scikit-learn tree ensembles can be compiled")
    return sio.load(str(path), trusted=untrusted)


def _load_pickle(path: Path) -> Any:
    # Runs arbitrary code from the archive: only on explicit opt-in, only inside the isolated compiler.
    log.warning("loading pickled model %s because CompilerOptions allow_pickle is true", path.name)
    import joblib

    return joblib.load(path)


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load a scikit-learn tree ensemble and import it into Treelite."""
    import sklearn
    import treelite

    files = find_model_files(model_dir, (".skops", *_PICKLE_SUFFIXES), "SKLEARN",
                             "Save the model with skops.io.dump(model, 'model.skops').")
    skops_files = [f for f in files if f.suffix == ".skops"]
    if len(skops_files) > 1 or (not skops_files and len(files) > 1):
        raise ClientError(f"the archive contains several model files {[f.name for f in files]}; include one")
    if skops_files:
        path = skops_files[0]
        estimator = _load_skops(path)
    else:
        path = files[0]
        if not options.allow_pickle:
            raise ClientError(
                f"'{path.name}' is a pickle, and loading a pickle runs code from the file, so it is refused by "
                "default. Save the model with skops (skops.io.dump(model, 'model.skops')), or set "
                "CompilerOptions {\"allow_pickle\": true} if you trust this file"
            )
        try:
            estimator = _load_pickle(path)
        except Exception as exc:
            raise ClientError(f"'{path.name}' could not be unpickled ({str(exc)[:300]})") from None
    try:
        model = treelite.sklearn.import_model(estimator)
    except Exception as exc:
        raise ClientError(
            f"the scikit-learn model {type(estimator).__name__} cannot be compiled ({str(exc).splitlines()[0][:200]}); "
            "supported: RandomForest/ExtraTrees/GradientBoosting/HistGradientBoosting/IsolationForest "
            "classifiers and regressors"
        ) from None
    inputs, outputs = tree_specs(model, config, "SKLEARN")
    return LoadedModel(
        framework="SKLEARN",
        framework_version=f"scikit-learn {sklearn.__version__}",
        kind="tree",
        inputs=inputs,
        outputs=outputs,
        model_files=[str(path.relative_to(model_dir))],
        tree_model=model,
        extra={"estimator": type(estimator).__name__},
    )
