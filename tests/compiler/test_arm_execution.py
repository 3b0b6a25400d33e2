"""ARM artifacts executed, not just inspected: tree-ensemble libraries (plain C ABI) run under
qemu-user through a small C harness cross-compiled for the same ABI, compared with XGBoost."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from kiln.catalog import TargetCatalog

from tests.compiler.test_trees import _compile

# Calls TL2cgen's C API (header.h of the generated code): predict(union Entry*, int, float*).
HARNESS = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
union Entry { int missing; float fvalue; int qvalue; };
typedef void (*predict_fn)(union Entry*, int, float*);
typedef void (*post_fn)(float*);
typedef int (*num_fn)(void);
int main(int argc, char** argv) {
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 2; }
  predict_fn predict = (predict_fn)dlsym(lib, "predict");
  num_fn num_feature = (num_fn)dlsym(lib, "get_num_feature");
  int n = num_feature(), rows = atoi(argv[2]);
  union Entry* row = calloc(n, sizeof(union Entry));
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < n; ++i) { if (scanf("%f", &row[i].fvalue) != 1) return 3; }
    float out[1] = {0};
    predict(row, 0, out);
    printf("%.9g\n", out[0]);
  }
  return 0;
}
"""


@pytest.mark.parametrize("device", ["ml_c6g", "rasp3b"])
def test_arm_tree_artifact_runs_under_qemu_and_matches_xgboost(tmp_path: Path, device: str) -> None:
    target = TargetCatalog().device(device)
    toolchain = target.toolchain
    assert toolchain is not None and toolchain.emulator is not None
    gcc = toolchain.cxx.replace("g++", "gcc")
    if not (shutil.which(gcc) and shutil.which(toolchain.emulator)):
        pytest.fail(f"{gcc} / {toolchain.emulator} missing: `make install` installs requirements/debian.txt")
    # GIVEN an XGBoost classifier and its Kiln artifact for an ARM board
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 3] > 0).astype(int)
    clf = xgb.XGBClassifier(n_estimators=8, max_depth=3).fit(X, y)
    (tmp_path / "m").mkdir()
    clf.get_booster().save_model(str(tmp_path / "m/model.json"))
    artifact = _compile(tmp_path / "m", "XGBOOST", device, tmp_path)
    with tarfile.open(artifact) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    # AND a harness built with the same cross toolchain
    (tmp_path / "harness.c").write_text(HARNESS)
    subprocess.run([gcc, "-O1", "-o", str(tmp_path / "harness"), str(tmp_path / "harness.c"), "-ldl"], check=True)
    # WHEN the artifact runs on the emulated CPU
    result = subprocess.run([toolchain.emulator, "-L", str(toolchain.sysroot), str(tmp_path / "harness"),
                             str(tmp_path / "x/model.so"), str(len(X))],
                            input="\n".join(" ".join(f"{v:.9g}" for v in row) for row in X),
                            capture_output=True, text=True, timeout=120, check=False)
    # THEN it prints XGBoost's probabilities
    assert result.returncode == 0, result.stderr
    probabilities = np.array([float(v) for v in result.stdout.split()], dtype=np.float32)
    np.testing.assert_allclose(probabilities, clf.predict_proba(X)[:, 1], rtol=1e-5, atol=1e-6)
