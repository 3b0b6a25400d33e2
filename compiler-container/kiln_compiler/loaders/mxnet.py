"""MXNet checkpoints (``PREFIX-symbol.json`` + ``PREFIX-NNNN.params``): exported to ONNX, then the ONNX path.

mxnet 1.9.1 needs numpy 1.23 and has no Python 3.11 build, so the export runs in a separate Python 3.9
environment (requirements/mxnet.txt): ``kiln_compiler/mxnet_convert.py`` is run with the interpreter named by
``KILN_MXNET_PYTHON`` (default: the repository's ``.venv-mxnet`` when present, else the image's
``/opt/kiln/mxnet``) and writes an ONNX file with ``mx.onnx.export_model``. DataInputConfig (NCHW) is required,
as in SageMaker Neo, because an MXNet symbol carries no input shapes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import ClientError, CompilationError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parent.parent / "mxnet_convert.py"
_REPO_VENV = Path(__file__).resolve().parents[3] / ".venv-mxnet" / "bin" / "python"
_IMAGE_VENV = Path("/opt/kiln/mxnet/bin/python")
TIMEOUT_S = 600


def mxnet_python() -> Path:
    """The isolated MXNet environment's interpreter."""
    named = os.environ.get("KILN_MXNET_PYTHON")
    if named:
        return Path(named)
    return _REPO_VENV if _REPO_VENV.exists() else _IMAGE_VENV


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Export the MXNet checkpoint in ``model_dir`` to ONNX in the MXNet environment and import that."""
    import onnx

    from .onnx import from_proto

    if config.empty:
        raise ClientError('DataInputConfig is required for MXNET models (NCHW), for example {"data": [1, 3, 224, 224]}')
    python = mxnet_python()
    if not python.exists():
        raise CompilationError(f"the MXNet environment is not installed ({python} not found; run make install or "
                               "set KILN_MXNET_PYTHON)")
    shapes: object = ({k: list(v) for k, v in config.by_name.items()} if config.by_name
                      else [list(s) for s in config.by_position])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with tempfile.TemporaryDirectory(prefix="kiln-mxnet-") as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            proc = subprocess.run(
                [str(python), "-I", str(SCRIPT), str(model_dir), json.dumps(shapes), str(out)],
                capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClientError(f"exporting the MXNet model to ONNX took longer than {TIMEOUT_S} s") from None
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            log.info("mxnet_convert failed (%d): %s", proc.returncode, proc.stderr[-4000:])
            raise ClientError(lines[-1][:500] if lines else f"MXNet conversion failed (exit {proc.returncode})")
        summary_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        summary = json.loads(summary_lines[-1])
        model = onnx.load(str(out))
    onnx.checker.check_model(model)
    return from_proto(model, config, framework="MXNET", framework_version=f"mxnet {summary['mxnet']} via onnx "
                      f"{summary['onnx']}", model_files=[summary["symbol"], summary["params"]])
