"""Budgeted tuning, deadline and database reuse."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kiln import progress

tvm = pytest.importorskip("tvm")
from kiln.catalog import TargetCatalog  # noqa: E402
from kiln_compiler.errors import ClientError  # noqa: E402
from kiln_compiler.options import CompilerOptions, TuningBudget  # noqa: E402
from kiln_compiler.pipeline import compile_relax  # noqa: E402
from kiln_compiler.tuning import TuningDatabase  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

HOST = {"kind": "llvm", "mcpu": "haswell"}


def _dense_module() -> Any:
    w = relax.const(np.random.default_rng(0).standard_normal((64, 32)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.matmul(x, w))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("bad", ['{"tuning": {"trials": -1}}', '{"tuning": {"trials": 0}}',
                                 '{"tuning": {"minutes": 0}}', '{"tuning": {"trials": 2.5}}'])
def test_budget_from_options(bad: str) -> None:
    # GIVEN CompilerOptions for a target  WHEN parsed  THEN trials/minutes become a budget
    c4 = TargetCatalog().device("ml_c4")
    assert CompilerOptions.parse('{"tuning": {"trials": 20}}', c4).tuning == TuningBudget(trials=20)
    assert CompilerOptions.parse('{"tuning": {"minutes": 2}}', c4).tuning == TuningBudget(seconds=120.0)
    assert CompilerOptions.parse("{}", c4).tuning is None
    # AND the API's bounds (kiln.rules) hold in the compiler too: no zero, negative or fractional trials
    with pytest.raises(ClientError, match="tuning"):
        CompilerOptions.parse(bad, c4)


@pytest.mark.slow
def test_tuned_record_is_reused_by_a_second_compile(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # GIVEN a database filled by a small tuned compile
    db = TuningDatabase(tmp_path / "db")
    first = compile_relax(_dense_module(), HOST, tuning=TuningBudget(trials=8), database=db,
                          deadline=time.time() + 240)
    assert first.summary["tuned"] >= 1
    # (the tuner reported its progress on stderr, for `kiln compile` to show: start, per kernel, end)
    events = [e for e in map(progress.parse, capfd.readouterr().err.splitlines()) if e and e["event"] == "tuning"]
    assert [e["phase"] for e in events] == ["start", "tiles", "search", "end"]
    assert events[0]["total"] == events[-1]["done"] == 1 and events[0]["stop_at"] > time.time()
    records = len(db)
    # WHEN the same model compiles again without a budget
    second = compile_relax(_dense_module(), HOST, database=TuningDatabase(tmp_path / "db"))
    # THEN nothing is tuned, the tuned kernel is reused and no record is added
    assert second.summary["tuned"] == 0
    assert second.summary["reused"] == first.summary["tuned"]
    assert len(db) == records


@pytest.mark.slow
def test_tuning_never_passes_the_deadline(tmp_path: Path) -> None:
    # GIVEN a huge trial budget and a deadline 40 s away
    deadline = time.time() + 40
    # WHEN compiling
    result = compile_relax(_dense_module(), HOST, tuning=TuningBudget(trials=100000),
                           database=TuningDatabase(tmp_path / "db"), deadline=deadline)
    # THEN the compile finished before the deadline, with an executable
    assert time.time() < deadline
    assert result.executable is not None


def test_no_tuning_for_a_target_this_machine_cannot_run(tmp_path: Path) -> None:
    # GIVEN an aarch64 target and a budget  WHEN compiling  THEN nothing is tuned
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}
    result = compile_relax(_dense_module(), target, tuning=TuningBudget(trials=8),
                           database=TuningDatabase(tmp_path / "db"), deadline=time.time() + 60)
    assert result.summary["tuned"] == 0
    assert result.summary["default"] >= 1


def test_tuning_order_measures_compute_bound_kernels_only() -> None:
    # GIVEN the kernels of a fused network
    from kiln_compiler.tuning.search import _tuning_order

    names = ["transpose3", "fused_matmul_add", "concatenate1", "fused_conv2d1_add_relu", "max_pool2d",
             "fused_conv2d_add_relu", "reshape2"]
    # WHEN ordered for tuning
    order = _tuning_order(names)
    # THEN convolutions come first, then matmuls and pools; memory-bound copies are not tuned at all
    assert order == ["fused_conv2d1_add_relu", "fused_conv2d_add_relu", "fused_matmul_add", "max_pool2d"]


def _conv_module() -> Any:
    rng = np.random.default_rng(1)
    w = relax.const(rng.standard_normal((32, 16, 3, 3)).astype("float32") / 12)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 16, 14, 14), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.slow
def test_default_schedule_competes_with_searched_candidates(tmp_path: Path) -> None:
    # GIVEN a convolution and a search budget of 2 candidates
    import json

    db = TuningDatabase(tmp_path / "db")
    x = np.random.default_rng(0).standard_normal((1, 16, 14, 14)).astype("float32")
    # WHEN it is tuned
    result = compile_relax(_conv_module(), HOST, tuning=TuningBudget(trials=2), database=db,
                           deadline=time.time() + 240)
    # THEN the database holds, for the conv kernel, the searched candidates and Kiln's default
    #      schedule as a measured record (the database applies whichever ran fastest)
    assert result.summary["tuned"] >= 1
    searched = [json.loads(line) for line in db.tuning_record_path.read_text().splitlines()]
    kiln = [json.loads(line) for line in (db.local_dir / "kiln_tuning_record.json").read_text().splitlines()]
    assert 1 <= len(searched) <= 2
    assert len(kiln) >= 2  # the default tile and at least one variant
    # AND the applied schedules compute the right result
    got = relax.VirtualMachine(result.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = relax.VirtualMachine(compile_relax(_conv_module(), HOST, default_schedules=False).executable,
                                tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_bigger_budget_searches_kernels_that_only_have_kiln_tiles(tmp_path: Path) -> None:
    # GIVEN a database where the conv kernel has Kiln's measured tiles but no searched records
    #       (a first tune whose time ran out after the tile variants)
    db = TuningDatabase(tmp_path / "db")
    compile_relax(_conv_module(), HOST, tuning=TuningBudget(trials=2), database=db, deadline=time.time() + 240)
    db.tuning_record_path.unlink()
    db.workload_path.unlink()
    kiln_records = len(db)
    assert kiln_records >= 2
    # WHEN the model compiles again with a budget
    again = compile_relax(_conv_module(), HOST, tuning=TuningBudget(trials=2), database=TuningDatabase(tmp_path / "db"),
                          deadline=time.time() + 240)
    # THEN the search runs for that kernel (its tiles are not measured twice) and it counts as tuned
    assert db.tuning_record_path.exists() and db.tuning_record_path.read_text().strip()
    assert len(db) > kiln_records
    assert again.summary["tuned"] >= 1
