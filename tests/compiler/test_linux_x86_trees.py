"""LINUX_X86 (32-bit): tree ensembles built with the i686 toolchain `make install` provides, executed
under qemu-i386 through the same C harness as the ARM artifacts, compared with XGBoost."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from tests.compiler.conftest import compile_artifact, target_named
from tests.compiler.test_arm_execution import HARNESS

EM_386 = 3


def test_linux_x86_tree_artifact_runs_under_qemu_and_matches_xgboost(tmp_path: Path) -> None:
    target = target_named("LINUX:X86")
    toolchain = target.toolchain
    assert toolchain is not None and toolchain.emulator is not None and toolchain.sysroot is not None
    gcc = toolchain.cxx.replace("g++", "gcc")
    if not (shutil.which(gcc) and shutil.which(toolchain.emulator)):
        pytest.fail(f"{gcc} / {toolchain.emulator} missing: `make install` installs requirements/debian.txt")
    # GIVEN an XGBoost classifier compiled for TargetPlatform LINUX/X86
    rng = np.random.default_rng(1)
    X = rng.standard_normal((48, 5)).astype(np.float32)
    y = (X[:, 1] - X[:, 4] > 0).astype(int)
    clf = xgb.XGBClassifier(n_estimators=6, max_depth=3).fit(X, y)
    (tmp_path / "m").mkdir()
    clf.get_booster().save_model(str(tmp_path / "m/model.json"))
    artifact = compile_artifact(tmp_path / "m", "XGBOOST", "LINUX:X86", tmp_path)
    with tarfile.open(artifact) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    library = tmp_path / "x/model.so"
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 1 and int.from_bytes(header[18:20], "little") == EM_386
    # AND the harness built with the same toolchain
    (tmp_path / "harness.c").write_text(HARNESS)
    subprocess.run([gcc, "-O1", "-o", str(tmp_path / "harness"), str(tmp_path / "harness.c"), "-ldl"], check=True)
    # WHEN the 32-bit artifact runs on the emulated CPU
    result = subprocess.run([toolchain.emulator, "-L", toolchain.sysroot, str(tmp_path / "harness"), str(library),
                             str(len(X))], input="\n".join(" ".join(f"{v:.9g}" for v in row) for row in X),
                            capture_output=True, text=True, timeout=120, check=False)
    # THEN it prints XGBoost's probabilities
    assert result.returncode == 0, result.stderr
    probabilities = np.array([float(v) for v in result.stdout.split()], dtype=np.float32)
    np.testing.assert_allclose(probabilities, clf.predict_proba(X)[:, 1], rtol=1e-5, atol=1e-6)
