"""`make demo` (scripts/demo.py) as a newcomer runs it: the host's target, a check, an honest table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kiln.host import host_target, target_isa_label

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_compiles_for_this_host_and_compares_with_both_peers_cleanly(tmp_path: Path) -> None:
    # GIVEN a fresh directory  WHEN the demo runs there (as `make demo` does, 2 threads)
    env = {**os.environ, "TVM_NUM_THREADS": "2", "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    lines = output.splitlines()
    # THEN it compiled for the catalog target matching this machine and checked the output against ORT
    host = host_target()
    assert (tmp_path / "demo-out" / f"squeezenet-{host.name}.tar.gz").is_file()
    assert f"target {host.name} (matches this host)" in output
    assert re.search(r"output matches ONNX Runtime \(max abs diff [0-9.e+-]+\)", output)
    # AND the table has Kiln and both peers the bench measures, each with Kiln's ratio to it
    assert re.search(rf"Kiln \({host.name}, {re.escape(target_isa_label(host))}\)\s+│\s+\d+\.\d+", output)
    for peer in ("ONNX Runtime", "OpenVINO"):
        assert re.search(rf"{peer}\s+│\s+\d+\.\d+\s+│\s+\d+\.\d+", output), peer
    assert re.search(r"Kiln / faster peer \((ONNX Runtime|OpenVINO)\): \d+\.\d+", output)
    # AND nothing else: no Lambda JSON, no library log lines, no empty {}, no stage after COMPLETED
    assert not [line for line in lines if line.strip() in ("{", "}", "{ }", "{}") or line.lstrip().startswith('{"')
                or " INFO " in line or "kiln.runners" in line]
    final = next(i for i, line in enumerate(lines) if line.endswith("status COMPLETED"))
    assert not [line for line in lines[final + 1:] if "stage " in line]
