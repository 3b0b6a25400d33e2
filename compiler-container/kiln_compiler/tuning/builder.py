"""MetaSchedule builder: one process pool for the whole tune, no ``tensor_intrin`` import.

TVM's default builder makes a pool per batch and imports ``tvm.s_tir.tensor_intrin`` in every
worker (31 s per build); this one keeps fresh interpreters for the whole tune and refuses work
past the tuning deadline.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor

from ..schedules.stack import TIR_PIPELINE


def _worker_init() -> None:
    import tvm  # noqa: F401 - load libtvm once per worker


def _build_one(mod_json: str, target_json: str, work_dir: str) -> tuple[str | None, str | None]:
    """Build one candidate in a worker process: (artifact path, error)."""
    try:
        import tvm
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = tvm.ir.load_json(mod_json)
        target = tvm.target.Target(json.loads(target_json))
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        # candidates are built as the artifact is (tile accumulators on the stack, ADR 0057)
        rt_mod = tvm.compile(mod, target=target, tir_pipeline=TIR_PIPELINE)
        # one directory per artifact: the runner removes the artifact's directory after use
        path = os.path.join(tempfile.mkdtemp(dir=work_dir), "tvm_tmp_mod.tar")
        rt_mod.export_library(path)
        return path, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _jsonable(value: Any) -> Any:
    """Plain Python values from TVM FFI containers (Map, Array, Target, IntImm)."""
    if isinstance(value, tvm.target.Target):
        return _jsonable(value.export())
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or hasattr(value, "__len__"):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value"):
        return value.value
    return str(value)


def target_dict(target: Any) -> dict[str, Any]:
    """A JSON-able dict of a Target (host included)."""
    out = _jsonable(target.export())
    assert isinstance(out, dict)
    return out


@derived_object
class KilnBuilder(ms.builder.PyBuilder):
    """MetaSchedule builder: one spawn pool for the whole tune; refuses work past ``deadline``."""

    def __init__(self, *, work_dir: str, max_workers: int | None = None, deadline: float | None = None,
                 timeout_sec: float = 120.0) -> None:
        super().__init__()
        self.work_dir = work_dir
        self.deadline = deadline
        # fresh interpreters (no fork of a threaded parent, no re-import of __main__), kept for
        # the whole tune instead of MetaSchedule's pool-per-batch
        self.pool = PopenPoolExecutor(
            max_workers=max_workers or os.cpu_count() or 1,
            timeout=timeout_sec,
            initializer=_worker_init,
        )

    def build(self, build_inputs: list[Any]) -> list[Any]:
        if self.deadline is not None and time.time() > self.deadline:
            return [ms.builder.BuilderResult(None, "kiln: tuning deadline reached") for _ in build_inputs]
        futures = [
            self.pool.submit(_build_one, tvm.ir.save_json(bi.mod), json.dumps(target_dict(bi.target)),
                             self.work_dir)
            for bi in build_inputs
        ]
        out = []
        for fut in futures:
            try:
                out.append(ms.builder.BuilderResult(*fut.result()))
            except Exception as exc:
                out.append(ms.builder.BuilderResult(None, f"kiln builder: {exc}"))
        return out
