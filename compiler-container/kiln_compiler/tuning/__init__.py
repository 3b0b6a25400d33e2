"""Budgeted MetaSchedule tuning over a shared record database (imports the schedules, never the pipeline)."""

from .database import TuningDatabase
from .search import apply_database, can_measure, tune_and_apply
from .shards import Shard, merge_records, partition, shard_prefix

__all__ = ["Shard", "TuningDatabase", "apply_database", "can_measure", "merge_records", "partition", "shard_prefix",
           "tune_and_apply"]
