"""Budgeted MetaSchedule tuning over a shared record database (imports the schedules, never the pipeline)."""

from .database import TuningDatabase
from .search import apply_database, can_measure, tune_and_apply

__all__ = ["TuningDatabase", "apply_database", "can_measure", "tune_and_apply"]
