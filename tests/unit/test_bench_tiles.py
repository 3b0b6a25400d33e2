"""bench/tiles.py, the tile-knob A/B of one convolution (ADR 0056): its knob syntax, and a run that builds
two variants of a small layer, checks them against each other and reports each one's rate."""

from __future__ import annotations

import re
from types import ModuleType

import pytest
from kiln_compiler.schedules.knobs import TileKnobs

from tests.unit.conftest import load_bench_module


@pytest.fixture(scope="module")
def tiles_bench() -> ModuleType:
    return load_bench_module("tiles")


def test_knobs_parse_ints_booleans_and_none(tiles_bench: ModuleType) -> None:
    # GIVEN a variant as the command line spells it
    # WHEN it is parsed
    knobs = tiles_bench.parse_knobs("max_vectors=1, fused_pixels=false,channels_outer=none,max_pixels=6")
    # THEN it is the TileKnobs with those fields and the defaults elsewhere
    assert knobs == TileKnobs(max_vectors=1, max_pixels=6, channels_outer=None, fused_pixels=False)
    assert tiles_bench.parse_knobs("") == TileKnobs()


def test_unknown_knob_is_refused(tiles_bench: ModuleType) -> None:
    # GIVEN a field TileKnobs does not have / WHEN parsed / THEN it is an error naming the field
    with pytest.raises(TypeError, match="pixel_count"):
        tiles_bench.parse_knobs("pixel_count=4")


def test_two_variants_are_built_compared_and_reported(tiles_bench: ModuleType,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a small 1x1 conv at 7x7 (a fused-pixel tile by default on AVX2) and its row-tile variant
    variants = [TileKnobs(), TileKnobs(fused_pixels=False)]
    # WHEN the bench builds, checks (rtol 1e-4 against the first variant) and times both
    tiles_bench.run_layer((16, 32, 1, 7, 1), "ml_c4", variants, 2, 2, tiles_bench._Evict(False))
    # THEN it reports the layer and one rate per variant, the first at ratio 1 to itself
    out = capsys.readouterr().out
    assert "layer 16->32 1x1 at 7x7 s1" in out
    rows = re.findall(r"([\d.]+) GFLOP/s  /default ([\d.]+)", out)
    assert len(rows) == 2
    assert all(float(rate) > 0 for rate, _ in rows)
    assert rows[0][1] == "1.000"
    assert "fused_pixels" in out
