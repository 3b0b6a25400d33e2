"""Budgeted tuning: apply shared records, measure Kiln's tiles, search the rest, within a deadline.

``tune_and_apply`` applies the database's records, then (with a budget, and only when this host
can run the target's code) measures each compute-bound kernel's default schedule and tile
variants and runs MetaSchedule's search on it, one kernel at a time, in a child process killed at
the deadline. The database then applies the fastest record of each kernel: a kernel is never
given a schedule that measured slower than its default.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import tvm
import tvm_ffi
from kiln import isa, progress
from kiln.runtime import cpu_flags, host_machine
from tvm.s_tir import meta_schedule as ms

from ..options import TuningBudget
from ..schedules import default_schedule, is_scheduled, target_cpu, target_vector_unit, tile_variants
from .builder import KilnBuilder, target_dict
from .database import TuningDatabase
from .shards import Shard, partition

log = logging.getLogger(__name__)


def _prim_funcs(mod: Any) -> dict[Any, Any]:
    from tvm import tirx

    return {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def can_measure(target: Any) -> bool:
    """Whether this machine can run code for ``target``: same architecture, every CPU feature it uses."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if "windows" in triple or "mingw" in triple:
        return False
    try:
        cpu = target_cpu(target)
    except isa.UnknownCpuError:
        return False
    return isa.host_can_run(cpu, host_machine(), cpu_flags())


def apply_database(mod: Any, target: Any, database: TuningDatabase) -> tuple[Any, int]:
    """Apply the database's best records; returns (module, kernels taken from the database)."""
    from tvm import relax

    before = {gv.name_hint for gv, f in _prim_funcs(mod).items() if is_scheduled(f)}
    with target, database.open_all():
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    after = {gv.name_hint for gv, f in _prim_funcs(mod).items() if is_scheduled(f)}
    return mod, len(after - before)


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
    func = task_mod["main"]
    schedules, seen = [], set()
    for knobs in tile_variants():
        try:
            sch = default_schedule(func, target_vector_unit(target), knobs)
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
                 per_task: int, stop_at: float | None) -> None:
    """Child-process body: tune ``funcs`` into the JSON database in ``db_dir``, one kernel at a time.

    One kernel per MetaSchedule run: its records are committed when the run ends, so a kill at the
    deadline keeps every kernel finished before it (one joint run commits little before its first
    round over every kernel ends, which on 2 cores takes minutes). The search is kept small
    (population 64, 16 fresh samples) so each kernel's first measurements come in seconds."""

    target = tvm.target.Target(json.loads(target_json))
    database = TuningDatabase(db_dir)
    trials_left = budget
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
            searched = database.open_search()
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
                    builder=builder, runner=runner, database=database.open_search(),
                )
                trials_left -= trials
        finally:
            builder.pool.shutdown(wait=False)


def kernel_shares(mod: Any, count: int) -> list[list[str]]:
    """The tunable kernels of ``mod`` (fused, before tuning) split into ``count`` disjoint shares (ADR 0023).

    The split is over every tunable kernel, not over what a worker's database lacks, so every worker
    computes the same split whatever records it finds; kernels of one workload share a worker."""
    by_name = {gv.name_hint: f for gv, f in _prim_funcs(mod).items()}
    keyed = [(name, tvm_ffi.structural_hash(_task_module(by_name[name]))) for name in _tuning_order(list(by_name))]
    return partition(keyed, count)


def tune_and_apply(
    mod: Any,
    target: Any,
    *,
    database: TuningDatabase,
    tuning: TuningBudget | None,
    deadline: float | None,
    reserve_seconds: float = 0.0,
    shard: Shard | None = None,
) -> tuple[Any, dict[str, int]]:
    """Reuse records, tune what is left within budget and deadline, apply the results.

    Returns the module (tuned/reused kernels marked scheduled) and counts of kernels
    ``{"tuned": n, "reused": n}``. Tuning runs only when the target can run here. With ``shard``
    (a tuning worker, ADR 0023) only that worker's share of the tunable kernels is tuned, and the
    counts add ``"kernels"`` (the share's size). Kernels applied from records that this job's
    workers made (``database.recorded_by_workers``) count as tuned, not reused.
    """

    database.download()
    original = mod
    mod, reused = apply_database(mod, target, database)
    # with a budget: every compute-bound kernel that lacks Kiln's measured tiles or a search
    # (a kernel with only one of them is reused now and still improved by a bigger budget)
    todo = {}
    share: set[str] | None = None
    if shard is not None:
        share = set(kernel_shares(original, shard.count)[shard.index - 1])
    if tuning is not None:
        search_db, kiln_db = database.open_search(), database.open_kiln()
        tunable = set(_tuning_order([gv.name_hint for gv in _prim_funcs(original)]))
        if share is not None:
            tunable &= share
        for gv, f in _prim_funcs(original).items():
            if gv.name_hint in tunable and not is_scheduled(f):
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
        # `kiln compile` shows these (kiln.progress); the child writes one per kernel and phase
        progress.emit("tuning", phase="start", done=0, total=len(funcs), stop_at=stop_at)
        worker = PopenWorker()
        timeout = None if stop_at is None else max(1.0, stop_at - time.time())
        try:
            worker.send(_tune_worker, (funcs, json.dumps(target_dict(target)), str(database.local_dir),
                                       budget, tuning.trials_per_task if tuning else 64,
                                       None if stop_at is None else stop_at - 5.0), timeout=timeout)
            worker.recv()
        except Exception as exc:
            log.warning("tuning stopped: %s: %s", type(exc).__name__, str(exc)[-2000:])
        finally:
            worker.kill()
        progress.emit("tuning", phase="end", done=len(funcs), total=len(funcs), stop_at=stop_at)
        database.repair()
        database.upload()
        mod, applied = apply_database(original, target, database)
        scheduled = {gv.name_hint for gv, f in _prim_funcs(mod).items() if is_scheduled(f)}
        tuned = len(scheduled & {gv.name_hint for gv in todo})
        reused = applied - tuned
    elif database.recorded_by_workers:
        # the build of a fanned-out job: the workers' records were merged in before this compile
        fresh = {gv.name_hint for gv, f in _prim_funcs(original).items() if not is_scheduled(f)
                 and tvm_ffi.structural_hash(_task_module(f)) in database.recorded_by_workers}
        scheduled = {gv.name_hint for gv, f in _prim_funcs(mod).items() if is_scheduled(f)}
        tuned = len(scheduled & fresh)
        reused -= tuned
    counts = {"tuned": tuned, "reused": reused}
    if share is not None:
        counts["kernels"] = len(share)
    return mod, counts
