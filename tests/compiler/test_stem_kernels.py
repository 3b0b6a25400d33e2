"""Stem convolutions (3 input channels) read the NCHW graph input in place of a transpose kernel (ADR 0045); the
transpose a 7x7 stem keeps is vectorised along the image rows (ADR 0055)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from kiln import isa  # noqa: E402
from kiln_compiler import pipeline  # noqa: E402
from kiln_compiler.schedules.interleave import InputInterleaveSchedule  # noqa: E402
from kiln_compiler.schedules.stem import nchw_stem  # noqa: E402

from tests.compiler.test_cpu_kernels import (  # noqa: E402
    ATOL,
    AVX2,
    RTOL,
    TARGETS,
    _conv_block,
    _run,
    assert_tile_variants_match_unscheduled,
)

STEMS = {
    # name: (cin, cout, k, stride, pad, hw, groups), the five light CNNs' first layers at smaller maps
    "squeezenet_3x3_s2_unpadded": (3, 64, 3, 2, 0, 57, 1),
    "shufflenet_3x3_s2_to_24": (3, 24, 3, 2, 1, 30, 1),
    "resnet_7x7_s2": (3, 64, 7, 2, 3, 38, 1),
    "grey_3x3": (1, 16, 3, 1, 1, 20, 1),
}


def _stem(name: str) -> Any:
    cin, cout, k, stride, pad, hw, groups = STEMS[name]
    return _conv_block(cin, cout, k, stride, pad, hw, groups, seed=len(name))


def _conv_name(fused: Any) -> str:
    (name,) = [gv.name_hint for gv, f in fused.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    return name


def _kernels(mod: Any, target: dict[str, Any]) -> Any:
    with tvm.target.Target(target):
        return pipeline._cpu_kernels(mod, tvm.target.Target.current(), True)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
@pytest.mark.parametrize("name", list(STEMS))
def test_stem_matches_unscheduled(name: str, target: dict[str, Any]) -> None:
    # GIVEN a first layer over an NCHW image (conv + bias + scale + relu)
    cin, _, _, _, _, hw, _ = STEMS[name]
    x = np.random.default_rng(2).standard_normal((1, cin, hw, hw)).astype("float32")
    # WHEN built with Kiln's kernels (the stem reading NCHW) and without any schedule
    # THEN the outputs agree (and no kernel kept TVM's unscheduled loops: _run asserts it)
    np.testing.assert_allclose(_run(_stem(name), x, target, True), _run(_stem(name), x, target, False),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["squeezenet_3x3_s2_unpadded", "shufflenet_3x3_s2_to_24"])
def test_stem_kernel_takes_the_nchw_input_and_no_transpose_runs(name: str) -> None:
    # GIVEN a first layer over an NCHW image, with and without padding
    cin, _, _, _, pad, hw, _ = STEMS[name]
    # WHEN its kernels are made for AVX2
    fused = _kernels(_stem(name), AVX2)
    main = fused["main"].script()
    # THEN no transpose kernel reads the image: the convolution's kernel takes the graph input itself, as NCHW
    assert [m.group(1) for m in re.finditer(r"call_tir\((\w+), \(x\b", main)] == [_conv_name(fused)], main
    (stem,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert [int(d) for d in stem.params[0].shape] == [1, cin, hw, hw]
    text = stem.script()
    # AND its (padded) copy stays NHWC, gathered from NCHW: the tile reads what every other conv's does
    #     (a zero-width pad is a plain copy, which the default schedule inlines into the tile)
    side = hw + 2 * pad
    assert f"pad_temp = T.sblock_alloc_buffer((T.int64(1), T.int64({side}), T.int64({side}), T.int64({cin})))" in text


@pytest.mark.parametrize("shape", [(16, 32, 3, 1, 1, 14, 1), (3, 64, 7, 2, 3, 38, 1)], ids=["16_channels", "7x7_padded"])
def test_convolution_keeps_its_input_transpose_where_reading_nchw_does_not_pay(shape: tuple[int, ...]) -> None:
    # GIVEN a first layer over a 16-channel input (each pixel's channels are one vector read), or a padded
    #       7x7 stem (its padded copy gathered from NCHW measured slower than the transpose and a copy)
    mod = _conv_block(*shape, seed=3)
    # WHEN its kernels are made  THEN the NHWC transpose stays and the convolution reads NHWC
    fused = _kernels(mod, AVX2)
    readers = [m.group(1) for m in re.finditer(r"call_tir\((\w+), \(x\b", fused["main"].script())]
    assert len(readers) == 1 and readers[0].startswith("transpose")
    assert nchw_stem(next(f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint)) is None


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
def test_kept_input_transpose_is_vectorised_along_rows(target: dict[str, Any]) -> None:
    # GIVEN a padded 7x7 stem, whose convolution keeps the NHWC transpose of the image (ADR 0045)
    with tvm.target.Target(target):
        kernels = pipeline._cpu_kernels(_stem("resnet_7x7_s2"), tvm.target.Target.current(), True)
    # WHEN the input interleave schedule runs
    interleave = InputInterleaveSchedule()
    scheduled = interleave(kernels)
    # THEN it takes the transpose (ADR 0055): one contiguous 16-column load per channel, the 3 channels unrolled
    #      around it, no gather (the outputs against the unscheduled build: test_stem_matches_unscheduled)
    assert len(interleave.scheduled) == 1 and interleave.scheduled[0].startswith("transpose"), interleave.scheduled
    script = scheduled[interleave.scheduled[0]].script()
    assert "T.vectorized(T.int64(16))" in script and "T.unroll(T.int64(3))" in script, script


@pytest.mark.parametrize("name", ["squeezenet_3x3_s2_unpadded", "shufflenet_3x3_s2_to_24"])
def test_every_tile_variant_of_a_stem_kernel_matches_unscheduled(name: str) -> None:
    # GIVEN a stem kernel reading NCHW and the tile variants tuning measures
    (func,) = [f for gv, f in _kernels(_stem(name), AVX2).functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    func = func.without_attr("layout_free_buffers")  # weights as plain inputs: no re-pack in this harness
    # WHEN each tile variant schedules it, THEN every distinct schedule computes what the unscheduled kernel does
    assert_tile_variants_match_unscheduled(func, isa.VectorUnit(8, 16), seed=4)
