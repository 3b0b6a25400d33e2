"""Tuning fanned out over workers (ADR 0023): the kernel split, the shard names, merging workers' records."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from kiln_compiler.options import Shard

tvm = pytest.importorskip("tvm")
from kiln_compiler.pipeline import _cpu_kernels, make_target  # noqa: E402
from kiln_compiler.tuning import partition  # noqa: E402
from kiln_compiler.tuning.search import _tuning_order, kernel_shares  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

HOST = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _mlp_module(dims: tuple[int, ...] = (8, 16, 12, 6, 4)) -> Any:
    """Dense layers of distinct shapes (one kernel each)."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, dims[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h: Any = x
            for a, b in itertools.pairwise(dims):
                w = relax.const(rng.standard_normal((a, b)).astype("float32"))
                h = bb.emit(relax.op.nn.relu(relax.op.matmul(h, w)))
            out = bb.emit_output(h)
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod: Any) -> Any:
    tgt = make_target(HOST)
    with tgt:
        return _cpu_kernels(mod, tgt, True)


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shares_are_deterministic_disjoint_and_cover_every_tunable_kernel(count: int) -> None:
    # GIVEN a real model's fused kernels (four dense layers)
    fused = _kernels(_mlp_module())
    tunable = _tuning_order([gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)])
    assert len(tunable) == 4
    # WHEN split for `count` workers, twice (each worker computes it on its own, from its own load of the model)
    shares = kernel_shares(fused, count)
    again = kernel_shares(_kernels(_mlp_module()), count)
    # THEN every worker gets the same split, the shares are disjoint and together hold every tunable kernel
    assert shares == again and len(shares) == count
    flat = [name for share in shares for name in share]
    assert sorted(flat) == sorted(tunable) and len(flat) == len(set(flat))
    # AND no worker gets two kernels while another has none
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_partition_deals_distinct_workloads_round_robin() -> None:
    # GIVEN kernels in tuning order, two of which share a workload (one record serves both)
    kernels = [("conv_a", 1), ("conv_b", 2), ("conv_c", 1), ("dense_d", 3), ("dense_e", 4)]
    # WHEN / THEN distinct workloads are dealt in order and conv_c follows conv_a
    assert partition(kernels, 2) == [["conv_a", "conv_c", "dense_d"], ["conv_b", "dense_e"]]
    assert partition(kernels, 5) == [["conv_a", "conv_c"], ["conv_b"], ["dense_d"], ["dense_e"], []]
    with pytest.raises(ValueError, match="at least 1"):
        partition(kernels, 0)


@pytest.mark.parametrize(("text", "shard"), [("1/1", Shard(1, 1)), ("2/3", Shard(2, 3)), (" 8/8 ", Shard(8, 8))])
def test_shard_parses_what_the_workflow_sets(text: str, shard: Shard) -> None:
    # GIVEN KILN_TUNING_SHARD as the Map state sets it  WHEN parsed  THEN worker i of N, named for its folder
    assert Shard.parse(text) == shard
    assert str(shard) == text.strip() and shard.name == f"shard-{shard.index}-of-{shard.count}"


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "-1/2", "1/0", ""])
def test_shard_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="KILN_TUNING_SHARD"):
        Shard.parse(text)


def test_a_fault_can_target_one_tuning_worker() -> None:
    # GIVEN the TEST-ONLY fault grammar (kiln_compiler.faults)
    from kiln_compiler.faults import Fault

    # WHEN / THEN `tune.I` names worker I's tune stage; other stages take no worker, and worker numbers start at 1
    assert Fault.parse("crash@tune.2") == Fault(kind="crash", stage="tune.2")
    assert Fault.parse("hang@tune").stage == "tune" and Fault.parse("exit=3@gather").stage == "gather"
    for bad in ("crash@build.2", "crash@tune.0", "crash@tune.x"):
        with pytest.raises(ValueError, match=r"tune\.I"):
            Fault.parse(bad)
