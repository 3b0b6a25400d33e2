"""Budgeted MetaSchedule tuning and a shared tuning database (local directory or S3 prefix).

* ``TuningConfig`` comes from ``CompilerOptions["tuning"]``: ``{"trials": N}`` and/or
  ``{"minutes": M}``.
* ``TuningDatabase`` holds MetaSchedule JSON-database records (workload + target keyed);
  an ``s3://bucket/prefix`` location is downloaded before and uploaded after a compile.
* ``tune_and_apply`` applies records, tunes the remaining kernels within the budget and the
  deadline (the tuning process is killed at the deadline; builds past it are refused), with a
  builder that keeps one process pool for the whole tune and never imports
  ``tvm.s_tir.tensor_intrin`` (31 s per build with TVM's default builder). Each kernel's
  default schedule and tile variants are measured first and recorded next to MetaSchedule's
  candidates: the database applies the fastest, never a record slower than the default.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from kiln import progress
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor

log = logging.getLogger(__name__)

# MetaSchedule's search records, and Kiln's own measured schedules (default tile and variants) kept
# apart: EvolutionarySearch replays database records as seeds and cannot replay a Kiln trace.
_SEARCH_FILES = ("database_workload.json", "database_tuning_record.json")
_KILN_FILES = ("kiln_workload.json", "kiln_tuning_record.json")
_RECORD_FILES = _SEARCH_FILES + _KILN_FILES


@dataclass(frozen=True)
class TuningConfig:
    """A tuning budget: a number of trials, a time budget in seconds, or both."""

    trials: int | None = None
    seconds: float | None = None
    trials_per_task: int = 64

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> TuningConfig | None:
        """Parse ``CompilerOptions`` (or its ``"tuning"`` member); None when no budget is set."""
        if not options:
            return None
        spec = options.get("tuning", options)
        if not isinstance(spec, dict):
            raise ValueError("tuning must be an object: {'trials': N} or {'minutes': M}")
        trials, minutes = spec.get("trials"), spec.get("minutes")
        if trials is None and minutes is None:
            return None
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 0):
            raise ValueError("tuning.trials must be a non-negative integer")
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes < 0):
            raise ValueError("tuning.minutes must be a non-negative number")
        return cls(trials=trials, seconds=None if minutes is None else float(minutes) * 60.0)

    def max_trials(self, n_tasks: int) -> int:
        """Trial budget for ``n_tasks`` kernels (time-only budgets get a generous cap)."""
        if self.trials is not None:
            return self.trials
        return n_tasks * self.trials_per_task


class TuningDatabase:
    """MetaSchedule JSON records in a local directory, or an S3 prefix mirrored to one."""

    def __init__(self, location: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                 s3_client: Any = None) -> None:
        self.location = str(location)
        self._s3 = s3_client
        if self.is_s3:
            self.local_dir = Path(cache_dir or tempfile.mkdtemp(prefix="kiln-tuning-"))
        else:
            self.local_dir = Path(cache_dir or location)
        self.local_dir.mkdir(parents=True, exist_ok=True)

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    @property
    def workload_path(self) -> Path:
        return self.local_dir / _RECORD_FILES[0]

    @property
    def tuning_record_path(self) -> Path:
        return self.local_dir / _RECORD_FILES[1]

    def _bucket_prefix(self) -> tuple[str, str]:
        from .aws import split_s3_uri

        bucket, prefix = split_s3_uri(self.location)
        return bucket, prefix.rstrip("/")

    def _client(self) -> Any:
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3")
        return self._s3

    def download(self) -> None:
        """Fetch the records from S3 (a missing prefix is an empty database)."""
        if not self.is_s3:
            return
        bucket, prefix = self._bucket_prefix()
        for name in _RECORD_FILES:
            key = f"{prefix}/{name}" if prefix else name
            try:
                self._client().download_file(bucket, key, str(self.local_dir / name))
            except Exception as exc:
                log.info("no tuning records at s3://%s/%s (%s)", bucket, key, exc)

    def upload(self) -> None:
        """Push the records to S3. Last writer wins: records are append-only and idempotent."""
        if not self.is_s3:
            return
        bucket, prefix = self._bucket_prefix()
        for name in _RECORD_FILES:
            path = self.local_dir / name
            if path.exists():
                self._client().upload_file(str(path), bucket, f"{prefix}/{name}" if prefix else name)

    def open_kiln(self) -> Any:
        """The JSONDatabase of Kiln's measured default schedules and tile variants."""
        return ms.database.JSONDatabase(
            path_workload=str(self.local_dir / _KILN_FILES[0]),
            path_tuning_record=str(self.local_dir / _KILN_FILES[1]),
            allow_missing=True,
        )

    def open_all(self) -> Any:
        """Search and Kiln records together: what a compile applies (the fastest of both)."""
        return ms.database.UnionDatabase(self.open(), self.open_kiln())

    def open(self) -> Any:
        """The MetaSchedule JSONDatabase of the search's records."""
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(
            path_workload=str(self.workload_path),
            path_tuning_record=str(self.tuning_record_path),
            allow_missing=True,
        )

    def __len__(self) -> int:
        paths = (self.tuning_record_path, self.local_dir / _KILN_FILES[1])
        return sum(sum(1 for line in p.read_text().splitlines() if line.strip()) for p in paths if p.exists())


# --------------------------------------------------------------------------------------
# Builder: one process pool, no tensor_intrin import
# --------------------------------------------------------------------------------------


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
        rt_mod = tvm.compile(mod, target=target)
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


def _target_dict(target: Any) -> dict[str, Any]:
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
            self.pool.submit(_build_one, tvm.ir.save_json(bi.mod), json.dumps(_target_dict(bi.target)),
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


# --------------------------------------------------------------------------------------
# Apply + tune
# --------------------------------------------------------------------------------------


def _prim_funcs(mod: Any) -> dict[Any, Any]:
    from tvm import tirx

    return {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _scheduled(func: Any) -> bool:
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"])


def can_measure(target: Any) -> bool:
    """Whether this machine can run code for ``target`` (same arch and an ISA it has)."""
    import platform

    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    machine = platform.machine()
    if triple and not triple.startswith(machine):
        return False
    if "windows" in triple or "mingw" in triple:
        return False
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if machine == "x86_64" and mcpu:
        flags = _cpu_flags()
        from kiln_compiler.tvm_pipeline import vector_lanes

        lanes = vector_lanes(target)
        if lanes == 16 and "avx512f" not in flags:
            return False
        if lanes == 8 and "avx2" not in flags:
            return False
    return True


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def apply_database(mod: Any, target: Any, database: TuningDatabase) -> tuple[Any, int]:
    """Apply the database's best records; returns (module, kernels taken from the database)."""
    from tvm import relax

    before = {gv.name_hint for gv, f in _prim_funcs(mod).items() if _scheduled(f)}
    with target, database.open_all():
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    after = {gv.name_hint for gv, f in _prim_funcs(mod).items() if _scheduled(f)}
    return mod, len(after - before)


def _repair_records(database: TuningDatabase) -> None:
    """Drop a partially written last line left by a killed tuning process."""
    for path in (database.local_dir / name for name in _RECORD_FILES):
        if not path.exists():
            continue
        good = []
        for line in path.read_text().splitlines():
            try:
                json.loads(line)
            except ValueError:
                continue
            good.append(line)
        path.write_text("".join(f"{line}\n" for line in good))


# Kernels worth measuring: the compute-bound ones. Layout copies, concatenations and reshapes are
# memory-bound; tuning them spends the budget for nothing.
_TUNABLE = ("conv", "matmul", "dense", "pool")


def _tuning_order(names: list[str]) -> list[str]:
    """Compute-bound kernels first (convolutions, then matmuls), the rest dropped."""
    def rank(name: str) -> int:
        return next((i for i, kind in enumerate(_TUNABLE) if kind in name), len(_TUNABLE))

    return sorted((n for n in names if rank(n) < len(_TUNABLE)), key=lambda n: (rank(n), n))


def _record_tile_variants(task_mod: Any, target: Any, builder: Any, runner: Any, db: Any) -> int:
    """Measure Kiln's default schedule of a kernel and its tile variants; commit them as records.

    The database then holds Kiln's own schedules next to MetaSchedule's candidates and applies
    whichever measured fastest: a short search can no longer replace a good default schedule
    with a slower one, and the tile choices the heuristic guesses (vectors of channels, pixels
    per tile, loop order) are settled by measurement. Returns how many were recorded."""
    from kiln_compiler.tvm_pipeline import default_schedule, tile_variants, vector_lanes

    func = task_mod["main"]
    schedules, seen = [], set()
    for knobs in tile_variants():
        try:
            sch = default_schedule(func, vector_lanes(target), knobs)
            ms.postproc.RewriteLayout().apply(sch)
        except Exception as exc:
            log.debug("tile variant %s does not apply: %s", knobs, exc)
            continue
        key = tvm_ffi.structural_hash(sch.mod)
        if key not in seen:
            seen.add(key)
            schedules.append(sch)
    if not schedules:
        return 0
    recorded = 0
    workload = db.commit_workload(task_mod)
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch in schedules])
    for sch, result in zip(schedules, built, strict=True):
        if result.error_msg:
            continue
        try:
            args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
            (future,) = runner.run([ms.runner.RunnerInput(result.artifact_path, "cpu", args_info)])
            measured = future.result()
            if measured.error_msg or not measured.run_secs:
                continue
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, measured.run_secs, target,
                                                             args_info))
            recorded += 1
        except Exception as exc:
            log.info("tile variant not recorded: %s", exc)
    return recorded


def _task_module(func: Any) -> Any:
    """The one-kernel module a tuning record's workload is keyed by."""
    from tvm import IRModule

    return IRModule({"main": func.with_attr("global_symbol", "main")})


def _tune_worker(funcs: dict[str, str], target_json: str, db_dir: str, budget: int,
                 per_task: int, stop_at: float | None) -> int:
    """Child-process body: tune ``funcs`` into the JSON database in ``db_dir``, one kernel at a time.

    One kernel per MetaSchedule run: its records are committed when the run ends, so a kill at the
    deadline keeps every kernel finished before it (one joint run commits little before its first
    round over every kernel ends, which on 2 cores takes minutes). The search is kept small
    (population 64, 16 fresh samples) so each kernel's first measurements come in seconds."""

    target = tvm.target.Target(json.loads(target_json))
    database = TuningDatabase(db_dir)
    trials_left = budget
    tuned = 0
    with tempfile.TemporaryDirectory(prefix="kiln-tune-", ignore_cleanup_errors=True) as work_dir:
        builder = KilnBuilder(deadline=stop_at, work_dir=work_dir)
        runner = ms.runner.LocalRunner(
            # weights flushed from cache before every run, as they are in a whole model (ResNet-50
            # carries ~100 MB): warm-cache measurements ranked tiles that re-read the weights first
            evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=0,
                                                       enable_cpu_cache_flush=True),
            timeout_sec=30,
        )
        try:
            order = _tuning_order(list(funcs))
            task_mods = {name: _task_module(tvm.ir.load_json(funcs[name])) for name in order}
            kiln_db = database.open_kiln()
            # Kiln's own tiles first, for every kernel: they are few and the likeliest to win
            for done, name in enumerate(order):
                if stop_at is not None and time.time() >= stop_at:
                    break
                progress.emit("tuning", phase="tiles", done=done, total=len(order), kernel=name, stop_at=stop_at)
                if kiln_db.has_workload(task_mods[name]):
                    continue
                try:
                    _record_tile_variants(task_mods[name], target, builder, runner, kiln_db)
                except Exception as exc:  # the search below still runs
                    log.warning("tile variants of %s not measured: %s", name, exc)
            searched = database.open()
            for done, name in enumerate(order):
                trials = min(per_task, trials_left)
                if trials <= 0 or (stop_at is not None and time.time() >= stop_at):
                    break
                progress.emit("tuning", phase="search", done=done, total=len(order), kernel=name, stop_at=stop_at)
                task_mod = task_mods[name]
                if searched.has_workload(task_mod):
                    continue
                task = ms.TuneContext(
                    mod=task_mod,
                    target=target,
                    space_generator="post-order-apply",
                    search_strategy=ms.search_strategy.EvolutionarySearch(
                        population_size=64, init_min_unmeasured=16, genetic_num_iters=2),
                    task_name=name,
                    num_threads=os.cpu_count() or 1,
                )
                ms.tune.tune_tasks(
                    tasks=[task], task_weights=[1.0], work_dir=work_dir,
                    max_trials_global=trials, max_trials_per_task=trials,
                    num_trials_per_iter=min(16, trials),
                    builder=builder, runner=runner, database=database.open(),
                )
                trials_left -= trials
                tuned += 1
        finally:
            builder.pool.shutdown(wait=False)
    return tuned


def tune_and_apply(
    mod: Any,
    target: Any,
    *,
    database: TuningDatabase,
    tuning: TuningConfig | None,
    deadline: float | None,
    reserve_seconds: float = 0.0,
) -> tuple[Any, dict[str, int]]:
    """Reuse records, tune what is left within budget and deadline, apply the results.

    Returns the module (tuned/reused kernels marked scheduled) and counts of kernels
    ``{"tuned": n, "reused": n}``. Tuning runs only when the target can run here.
    """

    database.download()
    original = mod
    mod, reused = apply_database(mod, target, database)
    # with a budget: every compute-bound kernel that lacks Kiln's measured tiles or a search
    # (a kernel with only one of them is reused now and still improved by a bigger budget)
    todo = {}
    if tuning is not None:
        search_db, kiln_db = database.open(), database.open_kiln()
        tunable = set(_tuning_order([gv.name_hint for gv in _prim_funcs(original)]))
        for gv, f in _prim_funcs(original).items():
            if gv.name_hint in tunable and not _scheduled(f):
                task = _task_module(f)
                if not (search_db.has_workload(task) and kiln_db.has_workload(task)):
                    todo[gv] = f
    tuned = 0
    start = time.time()
    stop_at = deadline - reserve_seconds if deadline is not None else None
    if tuning is not None and tuning.seconds is not None:
        stop_at = min(stop_at, start + tuning.seconds) if stop_at is not None else start + tuning.seconds
    budget = tuning.max_trials(len(todo)) if tuning is not None else 0
    if todo and budget > 0 and can_measure(target) and (stop_at is None or time.time() < stop_at):
        # Tuning runs in a child interpreter that is killed at ``stop_at``: MetaSchedule has no
        # time budget of its own, so this is what makes the deadline hard. Records are
        # committed line by line, so whatever was measured before the kill is kept.
        from tvm.support.popen_pool import PopenWorker

        funcs = {gv.name_hint: tvm.ir.save_json(f) for gv, f in todo.items()}
        progress.emit("tuning", phase="start", done=0, total=len(funcs), stop_at=stop_at)
        worker = PopenWorker()
        timeout = None if stop_at is None else max(1.0, stop_at - time.time())
        try:
            worker.send(_tune_worker, (funcs, json.dumps(_target_dict(target)), str(database.local_dir),
                                       budget, tuning.trials_per_task if tuning else 64,
                                       None if stop_at is None else stop_at - 5.0), timeout=timeout)
            worker.recv()
        except Exception as exc:
            log.warning("tuning stopped: %s: %s", type(exc).__name__, str(exc)[-2000:])
        finally:
            worker.kill()
        progress.emit("tuning", phase="end", done=len(funcs), total=len(funcs), stop_at=stop_at)
        _repair_records(database)
        database.upload()
        mod, applied = apply_database(original, target, database)
        scheduled = {gv.name_hint for gv, f in _prim_funcs(mod).items() if _scheduled(f)}
        tuned = len(scheduled & {gv.name_hint for gv in todo})
        reused = applied - tuned
    return mod, {"tuned": tuned, "reused": reused}
