"""QDQ int8 convolutions on AVX2 targets (ml_c4, haswell): s16 x s16 -> s32 kernels with ``vpmaddwd`` (ADR 0059).

Tolerance: the integer kernels accumulate exactly (s16 x s16 -> s32 pair sums, no saturation), and so does the
fp32-on-integers form that AVX2 targets compiled to before (ADR 0021: every sum of its products below 2^24);
both requantize the same integer with the same float32 epilogue, so their outputs are identical. Against ONNX
Runtime (.5 ties of the requantization, 1 quantized unit a layer) test_int8.py's ml_c4 and haswell tests compare.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tvm
from kiln_compiler import pipeline
from kiln_compiler.graph.quantized import AVX2, SDOT, VNNI, IntegerKernels
from kiln_compiler.schedules.int8_avx2 import PmaddwdConvSchedule
from kiln_compiler.schedules.tir import match_group_matmul, match_nhwc_conv
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import compile_and_disassemble, kernel_asm

HASWELL = {"kind": "llvm", "mcpu": "haswell"}
S16 = ("int16", "int16", "int32")
# (model fixture, input shape, integer kernels): the small CNN's strided 3-channel stem, 3x3 and 1x1; the data
# movement CNN's stem, squeeze and both expands; the ShuffleNet-like CNN's 24-channel stem (padded to 32). Grouped
# 1x1 layers (2 groups; ShuffleNet's 6 and 20 input, 20 and 17 output channels per group) and depthwise ones stay
# fp32 on the integers on AVX2 (graph.quantized.AVX2.group_matmuls): the builds still equal the reference exactly
MODELS = [("qdq_small_cnn_dir", (1, 3, 32, 32), 3), ("qdq_data_movement_dir", (1, 3, 46, 46), 4),
          ("qdq_grouped_pointwise_dir", (1, 3, 16, 16), 1)]


def _relax(model_dir: Path, shape: tuple[int, ...]) -> tvm.IRModule:
    return from_onnx(onnx.load(str(model_dir / "model.onnx")), shape_dict={"input": list(shape)},
                     keep_params_in_input=False)


def _integer_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of the kernels whose one reduction is an s16 x s16 -> s32 convolution or grouped matmul."""
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                  and (match_nhwc_conv(f, S16) or match_group_matmul(f, S16)) is not None)


def _run(executable: Any, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    return out


@pytest.fixture()
def fp32_on_integers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A compile for ``mcpu`` the way AVX2 targets compiled QDQ models before ADR 0059 (no integer kernel)."""
    def build(mod: tvm.IRModule, mcpu: str, lib: Path) -> tuple[Any, str]:
        with monkeypatch.context() as m:
            m.setattr(pipeline, "integer_kernels", lambda _tgt: None)
            return compile_and_disassemble(mod, mcpu, lib)
    return build


@pytest.mark.parametrize("target, tile", [
    ({"kind": "llvm", "mcpu": "haswell"}, AVX2), ({"kind": "llvm", "mcpu": "znver3"}, AVX2),
    ({"kind": "llvm", "mcpu": "znver4"}, VNNI), ({"kind": "llvm", "mcpu": "cascadelake"}, VNNI),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, None),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}, SDOT),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, None)])
def test_integer_kernels_per_target(target: dict[str, str], tile: IntegerKernels | None) -> None:
    # GIVEN x86 targets with AVX2 only, with AVX512-VNNI, AVX-512 without VNNI (ml_c5), Arm with and without dotprod
    # WHEN the pipeline picks their integer kernels
    # THEN AVX2-only CPUs get vpmaddwd's s16 tile, VNNI ones vpdpbusd's, dotprod sdot's, the others fp32 on the integers
    assert pipeline.integer_kernels(tvm.target.Target(target)) is tile


@pytest.mark.parametrize("fixture, shape, count", MODELS)
def test_every_integer_kernel_gets_the_pmaddwd_schedule(fixture: str, shape: tuple[int, ...], count: int,
                                                         request: pytest.FixtureRequest) -> None:
    # GIVEN a QDQ model's kernels made by Kiln's CPU graph passes for an AVX2 target
    mod = _relax(request.getfixturevalue(fixture), shape)
    with tvm.target.Target(HASWELL) as tgt:
        kernels = pipeline._cpu_kernels(mod, tgt, True)
    integer = _integer_kernels(kernels)
    # WHEN the AVX2 integer schedule runs
    schedule = PmaddwdConvSchedule()
    schedule(kernels)
    # THEN its convolutions are s16 x s16 -> s32 kernels and the schedule takes every one of them
    assert len(integer) == count, integer
    assert sorted(schedule.scheduled) == integer


@pytest.mark.parametrize("fixture, shape, count", MODELS)
def test_avx2_integer_kernels_equal_fp32_on_integers(
        fixture: str, shape: tuple[int, ...], count: int, request: pytest.FixtureRequest, tmp_path: Path,
        fp32_on_integers: Any) -> None:
    # GIVEN a QDQ model compiled for haswell with vpmaddwd kernels, and the same model as fp32 kernels on the
    # integer values (what AVX2 targets compiled to before)
    model_dir = request.getfixturevalue(fixture)
    executable, asm = compile_and_disassemble(_relax(model_dir, shape), "haswell", tmp_path / "avx2.so")
    reference, _ = fp32_on_integers(_relax(model_dir, shape), "haswell", tmp_path / "fp32.so")
    # WHEN both run the same input
    x = np.random.default_rng(7).standard_normal(shape).astype("float32")
    out, want = _run(executable, x), _run(reference, x)
    # THEN the integer build equals the fp32-on-integers build exactly (and is not a constant)
    np.testing.assert_array_equal(out, want)
    assert np.unique(out).size > 1
    # and each integer convolution kernel multiplies with vpmaddwd, with no fp32 FMA (a depthwise one stays fp32)
    names = {m.group(1) for m in re.finditer(r"<(fused_\w*(?:conv2d|matmul)\w*?)(?:_compute_)?>:", asm)}
    integer = {name: kernel_asm(asm, name) for name in names if "vpmaddwd" in kernel_asm(asm, name)}
    assert len(integer) == count, sorted(names)
    assert [name for name, code in integer.items() if "vfmadd" in code] == []


def test_qdq_squeezenet_avx2_equals_fp32_on_integers(qdq_squeezenet_dir: Path, tmp_path: Path,
                                                     fp32_on_integers: Any) -> None:
    # GIVEN SqueezeNet 1.0 in QDQ (26 convolutions: the 3-channel 7x7 stride-2 stem, 1x1 squeezes, 1x1 and 3x3
    # expands, the 1000-class 1x1) compiled for haswell with vpmaddwd kernels and as fp32 on the integers
    def relax_mod() -> tvm.IRModule:
        return from_onnx(onnx.load(str(qdq_squeezenet_dir / "model.onnx")), shape_dict={"data_0": [1, 3, 224, 224]},
                         keep_params_in_input=False)

    executable, asm = compile_and_disassemble(relax_mod(), "haswell", tmp_path / "avx2.so")
    reference, _ = fp32_on_integers(relax_mod(), "haswell", tmp_path / "fp32.so")
    # WHEN both run the same input
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype("float32")
    # THEN the outputs are identical, and the code multiplies with vpmaddwd
    out = _run(executable, x)
    np.testing.assert_array_equal(out, _run(reference, x))
    assert np.unique(out).size > 1 and "vpmaddwd" in asm
