"""`make bench` (bench/run.py) end to end on the smallest light model."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_writes_table_and_curve_against_onnx_runtime(tmp_path: Path) -> None:
    # GIVEN the bench script, SqueezeNet, and a curve of one short tuning point
    args = [sys.executable, str(ROOT / "bench" / "run.py"), "--models", "squeezenet", "--tune-models", "",
            "--curve-model", "squeezenet", "--curve-points", "0.25", "--repeat", "3", "--out", str(tmp_path)]
    # WHEN it runs
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # THEN the table has the untuned row with both latencies and their ratio
    (table,) = [p for p in tmp_path.glob("*.csv") if not p.name.endswith("-curve.csv")]
    rows = list(csv.DictReader(table.open()))
    assert [r["model"] for r in rows] == ["squeezenet"]
    kiln_ms, ort_ms, ratio = (float(rows[0][k]) for k in ("kiln_ms", "ort_ms", "ratio"))
    assert kiln_ms > 0 and ort_ms > 0
    assert ratio == pytest.approx(kiln_ms / ort_ms, rel=0.01, abs=0.01)  # each figure rounded to 0.01
    assert int(rows[0]["default"]) > 0
    # AND the curve has its tuning point, and the report names the CPU and the code measured
    (curve,) = tmp_path.glob("*-curve.csv")
    points = list(csv.DictReader(curve.open()))
    assert [float(p["tuning_min_total"]) for p in points] == [0.25]
    report = next(tmp_path.glob("*.md")).read_text()
    assert "- CPU: " in report and "- code: " in report and "| squeezenet | 0.0 |" in report
