"""`kiln compile`, `kiln run` and `kiln bench` as a user runs them."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from kiln.host import host_target, target_isa_label

from tests.conftest import tar_gz, tiny_onnx_model


def _kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, check=False)


def test_compile_run_and_bench_a_model(tmp_path: Path) -> None:
    # GIVEN a model archive on disk
    archive = tmp_path / "tiny.tar.gz"
    archive.write_bytes(tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
    # WHEN `kiln compile --json --verbose` runs it through the embedded stack
    result = _kiln("--verbose", "compile", str(archive), "--framework", "onnx", "--target-device", "ml_c4",
                   "--data-input-config", '{"x": [1, 8]}', "--output-dir", str(tmp_path / "out"), "--json",
                   cwd=tmp_path)
    # THEN it exits 0, showed progress and (verbose) the compiler's own log on stderr, wrote
    # {basename}-{target}.tar.gz and printed the describe result, alone, on stdout
    assert result.returncode == 0, result.stderr
    assert "status INPROGRESS" in result.stderr and "stage build" in result.stderr
    assert "kiln_compiler.job: stage build: start" in result.stderr
    described = json.loads(result.stdout)
    assert described["CompilationJobStatus"] == "COMPLETED"
    artifact = tmp_path / "out" / "tiny-ml_c4.tar.gz"
    assert artifact.is_file()
    assert described["ModelArtifacts"]["S3ModelArtifacts"].endswith("/tiny-ml_c4.tar.gz")
    # AND `kiln run` runs it on a .npy input and writes the outputs
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ran = _kiln("run", str(artifact), "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "y"),
                cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    weights = {i.name: np.frombuffer(i.raw_data, dtype=np.float32).reshape(tuple(i.dims))
               for i in tiny_onnx_model().graph.initializer}
    np.testing.assert_allclose(np.load(tmp_path / "y" / "output_0.npy"),
                               np.maximum(x @ weights["W"] + weights["b"], 0), rtol=1e-5, atol=1e-6)
    # AND `kiln bench` reports latency figures
    bench = _kiln("bench", str(artifact), "--repeat", "5", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout)
    assert figures["repeat"] == 5 and 0 < figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"]


def test_compile_failure_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    # GIVEN an archive without a model
    archive = tmp_path / "empty.tar.gz"
    archive.write_bytes(tar_gz({"notes.txt": b"nothing to compile"}))
    # WHEN compiled
    result = _kiln("compile", str(archive), "--framework", "ONNX", "--target-device", "ml_c4", cwd=tmp_path)
    # THEN the exit code is non-zero, the FailureReason and what to do are printed, no trace
    assert result.returncode == 1
    assert "FAILED: ClientError: InputConfiguration:" in result.stderr
    assert "what to do: Fix the model archive" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_compile_refuses_invalid_input_before_starting(tmp_path: Path) -> None:
    # GIVEN a target this deployment cannot compile for
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
    # WHEN compiled THEN the validation error is shown and the exit code is 2
    result = _kiln("compile", str(archive), "--framework", "ONNX", "--target-device", "ml_inf1", cwd=tmp_path)
    assert result.returncode == 2
    assert "ValidationException" in result.stderr and "ml_inf1" in result.stderr


def test_compile_for_this_host_shows_progress_and_a_summary_and_nothing_else(tmp_path: Path) -> None:
    # GIVEN a model archive
    archive = tmp_path / "tiny.tar.gz"
    archive.write_bytes(tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
    # WHEN compiled for `host` without --verbose or --json
    result = _kiln("compile", str(archive), "--framework", "ONNX", "--target-device", "host",
                   "--data-input-config", '{"x": [1, 8]}', "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # THEN the artifact is for the catalog target matching this machine
    host = host_target()
    assert (tmp_path / "out" / f"tiny-{host.name}.tar.gz").is_file()
    assert f"target {host.name} (matches this host)" in result.stderr
    # AND the output is status and stage lines, then the summary: no Lambda JSON, no library log
    # lines, no stage line after the final status, nothing on stdout
    lines = result.stderr.splitlines()
    assert result.stdout == ""
    assert not [line for line in lines if line.lstrip().startswith(("{", "}")) or " INFO " in line
                or "WARNING" in line or "kiln.runners" in line or "Traceback" in line]
    final = lines.index(next(line for line in lines if line.endswith("status COMPLETED")))
    assert any("stage upload" in line for line in lines[:final])
    assert not any("stage " in line for line in lines[final + 1:])
    summary = "\n".join(lines[final + 1:])
    assert "COMPLETED in" in summary and f"tiny-{host.name}.tar.gz" in summary
    assert f"ISA       {target_isa_label(host)}  ({host.isa[0]} " in summary
    assert "1 default schedule" in summary
    # AND the job record's profile, taken by the compiler on this host (local mode), stands for the
    # artifact's latency (no second figure timed in this process beside the embedded stack)
    assert re.search(r"profile\s+\d+\.\d+ ms median, \d+\.\d+ ms p90 over \d+ runs, peak \d+ MiB", summary)
    assert not re.search(r"^latency", summary, re.MULTILINE)


def test_an_unexpected_error_is_one_line_without_a_trace_unless_verbose(tmp_path: Path) -> None:
    # GIVEN an artifact directory whose manifest lacks its inputs (nothing the runtime checks for)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"runtime": "tvm-relax-vm", "library": "model.so"}))
    # WHEN run, then run with --verbose
    quiet = _kiln("run", str(broken), cwd=tmp_path)
    loud = _kiln("--verbose", "run", str(broken), cwd=tmp_path)
    # THEN the error is named in one line with the way to more, and only --verbose shows the trace
    assert quiet.returncode == 1 and "error: " in quiet.stderr and "--verbose" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    # AND a file that is no archive at all is a named user error (kiln-runtime's ArtifactError), exit 2
    (tmp_path / "not.tar.gz").write_bytes(b"not an archive")
    named = _kiln("run", str(tmp_path / "not.tar.gz"), cwd=tmp_path)
    assert named.returncode == 2 and "is not a Kiln artifact archive" in named.stderr


def test_compile_on_a_terminal_shows_one_live_display_then_the_summary(tmp_path: Path) -> None:
    # GIVEN a model archive and a terminal (a pseudo-terminal as stdin/stdout/stderr)
    archive = tmp_path / "tiny.tar.gz"
    archive.write_bytes(tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "compile", str(archive), "--framework", "ONNX",
                                "--target-device", "ml_c4", "--data-input-config", '{"x": [1, 8]}',
                                "--output-dir", str(tmp_path / "out")],
                               stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path, env=env)
    os.close(follower)
    received = bytearray()
    while True:  # read until the command closes the terminal (EIO), so it never blocks on a full buffer
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    os.close(leader)
    # WHEN it has finished
    assert process.wait(timeout=600) == 0, received.decode(errors="replace")[-3000:]
    screen = received.decode(errors="replace")
    # THEN it redrew one display in place (cursor control, no plain "[ 1.2s] status" lines) and ended
    # with the summary
    assert "\x1b[2K" in screen and "INPROGRESS" in screen
    assert not re.search(r"\[\s*\d+\.\ds\] status", screen)
    assert "COMPLETED" in screen and "tiny-ml_c4.tar.gz" in screen and "ms median" in screen
