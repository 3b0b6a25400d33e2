"""The shared tuning database: MetaSchedule JSON records in a local directory or an S3 prefix.

Records are keyed by workload (the kernel's structural hash) and target, so every job for the
same target reuses them. Two record sets are kept apart: MetaSchedule's search records, and
Kiln's own measured schedules (the default tile and its variants) — EvolutionarySearch replays
database records as seeds and cannot replay a Kiln trace. A compile applies the fastest of both.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

log = logging.getLogger(__name__)

# MetaSchedule's search records, and Kiln's own measured schedules (default tile and variants) kept
# apart: EvolutionarySearch replays database records as seeds and cannot replay a Kiln trace.
SEARCH_FILES = ("database_workload.json", "database_tuning_record.json")
KILN_FILES = ("kiln_workload.json", "kiln_tuning_record.json")
RECORD_FILES = SEARCH_FILES + KILN_FILES



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
        # workloads whose records this job's tuning workers made (merged in by the build, ADR 0023)
        self.recorded_by_workers: set[int] = set()
        self._downloaded = False

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    @property
    def search_workload_path(self) -> Path:
        """The workloads file of MetaSchedule's search records."""
        return self.local_dir / SEARCH_FILES[0]

    @property
    def search_record_path(self) -> Path:
        """The tuning-records file of MetaSchedule's search."""
        return self.local_dir / SEARCH_FILES[1]

    def _bucket_prefix(self) -> tuple[str, str]:
        from ..aws import split_s3_uri

        bucket, prefix = split_s3_uri(self.location)
        return bucket, prefix.rstrip("/")

    def _client(self) -> Any:
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3")
        return self._s3

    def download(self) -> None:
        """Fetch the records from S3 once (a missing prefix is an empty database); later calls keep the local
        copy, which may hold records merged in since (a fanned-out job's build, ADR 0023)."""
        if not self.is_s3 or self._downloaded:
            return
        self._downloaded = True
        bucket, prefix = self._bucket_prefix()
        for name in RECORD_FILES:
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
        for name in RECORD_FILES:
            path = self.local_dir / name
            if path.exists():
                self._client().upload_file(str(path), bucket, f"{prefix}/{name}" if prefix else name)

    def open_kiln(self) -> Any:
        """The JSONDatabase of Kiln's measured default schedules and tile variants."""
        return ms.database.JSONDatabase(
            path_workload=str(self.local_dir / KILN_FILES[0]),
            path_tuning_record=str(self.local_dir / KILN_FILES[1]),
            allow_missing=True,
        )

    def open_all(self) -> Any:
        """Search and Kiln records together: what a compile applies (the fastest of both)."""
        return ms.database.UnionDatabase(self.open_search(), self.open_kiln())

    def open_search(self) -> Any:
        """The MetaSchedule JSONDatabase of the search's records."""
        return ms.database.JSONDatabase(
            path_workload=str(self.search_workload_path),
            path_tuning_record=str(self.search_record_path),
            allow_missing=True,
        )

    def __len__(self) -> int:
        paths = (self.local_dir / SEARCH_FILES[1], self.local_dir / KILN_FILES[1])
        return sum(sum(1 for line in p.read_text().splitlines() if line.strip()) for p in paths if p.exists())

    def repair(self) -> None:
        """Drop a partially written last line left by a killed tuning process."""
        for path in (self.local_dir / name for name in RECORD_FILES):
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
