"""bench/kernels.py's static thread-balance model of Kiln's launcher (ADR 0032): chunks of a parallel loop."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.unit.conftest import load_bench_module


@pytest.fixture(scope="module")
def kernels_bench() -> ModuleType:
    return load_bench_module("kernels")


@pytest.mark.parametrize(("extent", "threads", "busiest"), [
    (9, 2, 5),      # 8 chunks of 2 (the last of 1, three empty): 5 iterations against 4
    (320, 2, 160),  # a multiple of the 8 chunks: even
    (1, 2, 1),      # one iteration: one thread works
    (7, 1, 7),      # one thread runs every chunk
    (100, 4, 28),   # 16 chunks of 7 (the last of 2): 4 chunks per thread, 28 for the first three
])
def test_busiest_thread_share_follows_the_static_chunks(kernels_bench: ModuleType, extent: int, threads: int,
                                                        busiest: int) -> None:
    # GIVEN a parallel loop of `extent` iterations split into 4 chunks per thread, claimed in order
    # WHEN the busiest thread's iterations are counted
    # THEN it is the ceil-sized chunks' sum the greedy claim gives it
    assert kernels_bench._thread_makespan(extent, threads) == busiest
