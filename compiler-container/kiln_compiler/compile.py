"""``compile_model``: the compiler as a library call (no S3, no STS, no task tokens).

The job adapter (``kiln_compiler.job``), ``kiln compile`` (through local mode), the bench and the
tests all compile through this one function, the way tvmc puts its CLI over a library call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import rules
from kiln.catalog import Target

from .backends import BuildResult, CompileRequest, backend_for
from .errors import ClientError
from .options import CompilerOptions

if TYPE_CHECKING:
    from .tuning import Shard, TuningDatabase

__all__ = ["BuildResult", "compile_model", "tune_model"]


def compile_model(model_dir: Path, framework: str, target: Target, options: CompilerOptions, *,
                  out_dir: Path, data_input_config: str | None = None, tuning_database: TuningDatabase | None = None,
                  deadline: float | None = None,
                  stage: Callable[[str], AbstractContextManager[object]] | None = None) -> BuildResult:
    """Compile the model unpacked in ``model_dir`` for ``target``; the files land in ``out_dir``.

    ``options`` must come from ``CompilerOptions.parse(text, target)`` (the rules for this target);
    ``data_input_config`` is the user's DataInputConfig string; ``tuning_database`` a
    ``kiln_compiler.tuning.TuningDatabase`` whose records are applied (and extended when
    ``options.tuning`` sets a budget); ``deadline`` (epoch seconds) bounds tuning; ``stage(name)``, a
    context manager factory, wraps the "load" and "build" stages (the job times and logs them). Raises
    ``ClientError`` for what the user can fix, ``ServerError`` for Kiln's faults."""
    framework = framework.upper()
    try:
        rules.check_framework_target(framework, target)
        if options.quantize is not None:
            rules.check_quantize_framework(framework, {"quantize": options.quantize})
    except rules.RuleError as exc:
        raise ClientError(exc.message) from None
    compile_backend = backend_for(target, framework)
    return compile_backend(CompileRequest(model_dir=model_dir, framework=framework, target=target, options=options,
                                          out_dir=out_dir, data_input_config=data_input_config,
                                          tuning_database=tuning_database, deadline=deadline,
                                          stage=stage or (lambda _name: contextlib.nullcontext())))


def tune_model(model_dir: Path, framework: str, target: Target, options: CompilerOptions, *, shard: Shard,
               tuning_database: TuningDatabase, data_input_config: str | None = None, deadline: float | None = None,
               stage: Callable[[str], AbstractContextManager[object]] | None = None) -> dict[str, int]:
    """Tuning worker ``shard`` of a fanned-out job (ADR 0023): its share of the kernels tuned into
    ``tuning_database`` within ``options.tuning``, nothing built. Only TVM CPU builds are tuned (``kiln.rules``
    refuses workers for the rest); returns ``{"kernels", "tuned", "reused"}``."""
    from .backends import tvm as tvm_backend

    framework = framework.upper()
    try:
        rules.check_framework_target(framework, target)
    except rules.RuleError as exc:
        raise ClientError(exc.message) from None
    return tvm_backend.tune(CompileRequest(model_dir=model_dir, framework=framework, target=target, options=options,
                                           out_dir=model_dir.parent / "build", data_input_config=data_input_config,
                                           tuning_database=tuning_database, deadline=deadline,
                                           stage=stage or (lambda _name: contextlib.nullcontext())), shard)
