"""Tuning fanned out over workers (ADR 0023): which kernels each worker tunes, and gathering their records.

A job with ``{"tuning": {"workers": N}}`` runs N tuning workers, worker ``i`` of N with
``KILN_TUNING_SHARD=i/N``. Every worker builds the same kernel list from the same model and takes
its share of :func:`partition`, so the shares are disjoint and cover every tunable kernel without
the workers talking to each other. Each worker tunes into a database of its own (MetaSchedule's
JSON files index workloads by line, so two processes must never append to one file) and uploads it
under the job's prefix; the build merges every worker's records into one database
(:func:`merge_records`) and applies them. A worker that failed uploads nothing: its kernels keep
their default schedules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from typing import Any

from ..options import Shard
from .database import TuningDatabase

log = logging.getLogger(__name__)

__all__ = ["Shard", "merge_records", "partition", "shard_prefix"]


def partition(kernels: Sequence[tuple[str, Hashable]], count: int) -> list[list[str]]:
    """Split ``kernels`` ((name, workload key) in tuning order) into ``count`` disjoint lists covering all.

    Kernels with the same workload go to the same worker (one record serves them all); distinct
    workloads are dealt round-robin in tuning order, so every worker gets a like mix of the costly
    convolutions first and the rest after. Deterministic: the same input gives the same split."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    shares: list[list[str]] = [[] for _ in range(count)]
    owner: dict[Hashable, int] = {}
    for name, key in kernels:
        if key not in owner:
            owner[key] = len(owner) % count
        shares[owner[key]].append(name)
    return shares


def shard_prefix(job_prefix: str, shard: Shard) -> str:
    """Where worker ``shard`` puts its records: ``<job prefix>/shard-i-of-N``."""
    return f"{job_prefix.rstrip('/')}/{shard.name}"


def _record_key(workload_hash: int, record: Any) -> str:
    # the trace printed as Python (TuningRecord.as_json cannot serialise the IndexMaps of Kiln's traces)
    run_secs = [round(float(t), 12) for t in (record.run_secs or [])]
    return f"{workload_hash}:{record.trace}:{json.dumps(run_secs)}:{record.target}"


def merge_records(source: TuningDatabase, dest: TuningDatabase) -> set[int]:
    """Copy every record of ``source`` into ``dest`` (search records to search, Kiln's to Kiln's), skipping
    records ``dest`` already holds. Returns the structural hashes of the workloads ``source`` has records for."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    recorded: set[int] = set()
    for open_db in (TuningDatabase.open_search, TuningDatabase.open_kiln):
        src, dst = open_db(source), open_db(dest)
        have = {_record_key(tvm_ffi.structural_hash(r.workload.mod), r) for r in dst.get_all_tuning_records()}
        for record in src.get_all_tuning_records():
            key_hash = tvm_ffi.structural_hash(record.workload.mod)
            recorded.add(key_hash)
            key = _record_key(key_hash, record)
            if key in have:
                continue
            have.add(key)
            workload = dst.commit_workload(record.workload.mod)
            dst.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs,
                                                              record.target, record.args_info))
    return recorded
