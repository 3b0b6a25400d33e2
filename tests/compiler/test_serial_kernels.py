"""Kernels too small to gain from a second thread keep serial loops (schedules/serial.py, ADR 0038)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from kiln_compiler import pipeline  # noqa: E402
from kiln_compiler.schedules import DefaultCPUSchedule, target_vector_unit  # noqa: E402
from kiln_compiler.schedules.cpu import default_schedule  # noqa: E402
from kiln_compiler.schedules.serial import SERIAL_WORK, kernel_work, parallel_loops, without_parallel  # noqa: E402
from tvm.s_tir import Schedule  # noqa: E402

from tests.compiler.conftest import shuffle_unit  # noqa: E402
from tests.compiler.test_cpu_kernels import ATOL, RTOL, TARGETS, _run  # noqa: E402


def _unscheduled_kernels(mod: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The target and ``mod``'s fused kernels by name, before any schedule."""
    tgt = tvm.target.Target(pipeline._with_num_cores(target))
    with tgt:
        fused = pipeline._cpu_kernels(mod, tgt, True)
    return tgt, {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _scheduled_kernels(mod: Any, target: dict[str, Any]) -> list[tuple[int | None, Any]]:
    """(block iterations before scheduling, scheduled PrimFunc) of every kernel of ``mod``."""
    tgt, kernels = _unscheduled_kernels(mod, target)
    with tgt:
        scheduled = DefaultCPUSchedule(target_vector_unit(tgt))(tvm.IRModule(
            {tvm.ir.GlobalVar(name): f for name, f in kernels.items()}))
    return [(kernel_work(kernels[gv.name_hint]), f) for gv, f in scheduled.functions_items()]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
def test_small_kernels_have_no_parallel_loop_and_large_ones_keep_theirs(target: dict[str, Any]) -> None:
    # GIVEN ShuffleNet's unit at 7x7 (272 channels): a depthwise conv and layout copies below the
    # threshold, grouped 1x1 convs above it
    kernels = _scheduled_kernels(shuffle_unit(272, 4, 7), target)
    small = [f for work, f in kernels if work is not None and work < SERIAL_WORK]
    large = [f for work, f in kernels if work is not None and work >= SERIAL_WORK]
    assert small and large
    # WHEN scheduled by Kiln's default schedule  THEN only the large kernels run parallel loops
    assert [parallel_loops(f) for f in small] == [0] * len(small)
    assert all(parallel_loops(f) >= 1 for f in large)


def test_serial_replay_is_the_same_loop_nest_without_parallel_loops() -> None:
    # GIVEN the default schedule of an elementwise kernel above the threshold (the batch norm, ReLU
    # and channel shuffle of ShuffleNet's unit at 28x28, 272 channels): one parallel loop
    tgt, kernels = _unscheduled_kernels(shuffle_unit(272, 4, 28), TARGETS[0])
    func = next(f for name, f in kernels.items() if "transpose" in name and "relu" in name)
    assert kernel_work(func) >= SERIAL_WORK
    sch = default_schedule(func, target_vector_unit(tgt))
    # WHEN its trace is replayed without the Parallel instructions
    serial = without_parallel(sch, func)
    # THEN the loop nest is the one the parallel schedule built, with that loop serial
    assert parallel_loops(sch.mod["main"]) == 1 and parallel_loops(serial.mod["main"]) == 0
    assert serial.mod["main"].script() == sch.mod["main"].script().replace("T.parallel(", "range(")


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
def test_serial_small_kernels_match_unscheduled(target: dict[str, Any]) -> None:
    # GIVEN ShuffleNet's unit at 7x7, whose depthwise conv and copies run serially
    mod = shuffle_unit(272, 4, 7)
    x = np.random.default_rng(2).standard_normal((1, 272, 7, 7)).astype("float32")
    # WHEN built with Kiln's kernels and without any schedule  THEN the outputs agree
    np.testing.assert_allclose(_run(mod, x, target, True), _run(mod, x, target, False), rtol=RTOL, atol=ATOL)


def test_default_schedule_of_a_small_kernel_replays_for_tuning() -> None:
    # GIVEN a small kernel: the depthwise conv of ShuffleNet's unit at 7x7 (272 channels)
    tgt, kernels = _unscheduled_kernels(shuffle_unit(272, 4, 7), TARGETS[0])
    depthwise = next(f for name, f in kernels.items() if "conv2d" in name and kernel_work(f) < SERIAL_WORK)
    # WHEN Kiln's default schedule is traced (what tuning measures and records as a candidate)
    sch = default_schedule(depthwise, target_vector_unit(tgt))
    # THEN its trace has no Parallel instruction and replays on the kernel to the same function
    assert sch.trace is not None and not any(inst.kind.name == "Parallel" for inst in sch.trace.insts)
    replayed = Schedule(depthwise)
    sch.trace.apply_to_schedule(replayed, remove_postproc=False)
    tvm.ir.assert_structural_equal(replayed.mod, sch.mod)
    assert parallel_loops(replayed.mod["main"]) == 0
