"""`make bench` (bench/run.py) end to end on the smallest light model: both peers, both ISAs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from kiln.host import host_target, target_isa_label

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_writes_table_and_curve_against_both_peers_on_both_isas(tmp_path: Path) -> None:
    # GIVEN the bench script, SqueezeNet (fp32 and reduced precision), and a curve of one short tuning point
    args = [sys.executable, str(ROOT / "bench" / "run.py"), "--models", "squeezenet", "--tune-models", "",
            "--curve-model", "squeezenet", "--curve-points", "0.25", "--repeat", "3", "--per-round", "2",
            "--reduced-models", "squeezenet", "--out", str(tmp_path)]
    # WHEN it runs
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # THEN the table has an untuned row for this host's widest-ISA target and one for AVX2 (ml_c4)
    host = host_target()
    (table,) = [p for p in tmp_path.glob("*.csv") if not p.name.endswith(("-curve.csv", "-reduced.csv"))]
    rows = list(csv.DictReader(table.open()))
    assert [(r["model"], r["target"]) for r in rows] == [("squeezenet", t) for t in dict.fromkeys([host.name, "ml_c4"])]
    for row in rows:
        # AND each row has Kiln's and both peers' latency, and the ratios to them and to the faster peer
        kiln_ms, ort_ms, openvino_ms = (float(row[k]) for k in ("kiln_ms", "ort_ms", "openvino_ms"))
        assert kiln_ms > 0 and ort_ms > 0 and openvino_ms > 0
        assert float(row["ratio"]) == pytest.approx(kiln_ms / ort_ms, rel=0.01, abs=0.01)  # figures rounded to 0.01
        assert float(row["ratio_openvino"]) == pytest.approx(kiln_ms / openvino_ms, rel=0.01, abs=0.01)
        assert float(row["ratio_faster_peer"]) == pytest.approx(kiln_ms / min(ort_ms, openvino_ms), rel=0.01, abs=0.01)
        assert row["faster_peer"] == ("ONNX Runtime" if ort_ms <= openvino_ms else "OpenVINO")
        assert int(row["default"]) > 0
    assert [r["isa"] for r in rows] == [target_isa_label(host), "AVX2"][: len(rows)]
    # AND the host target's row was timed again with one core busy, with its own ratio
    busy = rows[0]
    busy_ms = {k: float(busy[f"busy_{k}_ms"]) for k in ("kiln", "ort", "openvino")}
    assert all(ms > 0 for ms in busy_ms.values())
    assert float(busy["busy_ratio_faster_peer"]) == pytest.approx(
        busy_ms["kiln"] / min(busy_ms["ort"], busy_ms["openvino"]), rel=0.01, abs=0.01)
    # AND a reduced-precision row: Kiln int8 against ORT int8 on the same QDQ model and OpenVINO's default
    (reduced,) = list(csv.DictReader(next(tmp_path.glob("*-reduced.csv")).open()))
    assert reduced["model"] == "squeezenet" and float(reduced["kiln_int8_ms"]) > 0
    assert float(reduced["onnx_runtime_int8_ms"]) > 0 and float(reduced["openvino_default_ms"]) > 0
    # AND the curve has its tuning point, and the report names the CPU, the code, the peers' settings
    (curve,) = tmp_path.glob("*-curve.csv")
    points = list(csv.DictReader(curve.open()))
    assert [float(p["tuning_min_total"]) for p in points] == [0.25]
    report = next(tmp_path.glob("*.md")).read_text()
    assert "- CPU: " in report and "- code: " in report
    assert "INFERENCE_PRECISION_HINT=f32" in report and "openvino 2026.4.1" in report
    assert f"| squeezenet | {host.name} | 0.0 |" in report and "| squeezenet | ml_c4 | 0.0 |" in report
    assert "Geomean of Kiln / faster peer" in report and "one core kept busy" in report
    assert "Reduced precision on" in report
