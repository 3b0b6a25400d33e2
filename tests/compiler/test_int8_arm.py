"""QDQ int8 models on aarch64 with the dot-product instructions (Graviton2+): s8 x s8 ``sdot`` kernels (ADR 0060).

Compiled here, run under qemu-user (as tests/compiler/test_emulated_execution.py does): numerics and generated
code only, never speed. Tolerance as in test_int8.py: the integer convolutions accumulate exactly (the u8
activations shifted to s8, the shift's 128 * sum(W_q) folded into the per-channel correction); the only rounding
is the requantization, so outputs are at most 1 quantized unit from ONNX Runtime's (its exact reference session,
``accuracy.reference_session``), almost all identical, and equal to the fp32-on-integers build (an aarch64 target without dotprod),
which accumulates exactly too.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from kiln import emulate
from kiln.catalog import TargetCatalog
from kiln_compiler.accuracy import reference_session
from kiln_compiler.graph import QuantizedConvToInteger
from kiln_compiler.graph.quantized import SDOT
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import compile_artifact, disassemble
from tests.compiler.test_emulated_execution import aarch64  # noqa: F401 - fixture
from tests.compiler.test_int8 import MIN_EXACT, _calls, _output_scale
from tests.compiler.test_tflite import QUANT_STEPS, _input_for, _interpreter, tflite_int8_cnn_dir  # noqa: F401

# Graviton2 (neoverse-n1, dotprod) and a Raspberry Pi 4 (cortex-a72, no dotprod: fp32 kernels on the integers)
DOTPROD, NO_DOTPROD = "ml_c6g", "rasp4b"
OBJDUMP = "aarch64-linux-gnu-objdump"  # binutils of the aarch64 cross toolchain (requirements/debian.txt)


def _target(name: str):  # type: ignore[no-untyped-def]
    import tvm

    return tvm.target.Target(TargetCatalog().device(name).tvm_target)


@pytest.mark.parametrize("device, sdot", [("ml_c6g", True), ("ml_m6g", True), ("jetson_xavier", True),
                                          ("rasp4b", False), ("imx8mplus", False)])
def test_aarch64_targets_with_dotprod_get_sdot_kernels(device: str, sdot: bool) -> None:
    # GIVEN an aarch64 catalog target (Jetson Xavier: its Carmel host CPU)
    from kiln_compiler.pipeline import integer_kernels

    target = TargetCatalog().device(device)
    cpu = target.host or target.tvm_target
    import tvm

    # WHEN the pipeline decides its integer kernels
    kernels = integer_kernels(tvm.target.Target(cpu))
    # THEN the dotprod CPUs (Graviton2's neoverse-n1, Carmel) get s8 x s8 sdot, the others none
    assert (kernels is SDOT) is sdot and (kernels is None) is not sdot


def test_sdot_convs_read_s8_activations_with_the_shift_folded(qdq_small_cnn_dir: Path) -> None:
    # GIVEN the QDQ small CNN (u8 activations with non-zero zero points; a 3-channel stem)
    mod = from_onnx(onnx.load(str(qdq_small_cnn_dir / "model.onnx")), shape_dict={"input": [1, 3, 32, 32]},
                    keep_params_in_input=False)
    # WHEN the rewrite runs for sdot kernels
    rewrite = QuantizedConvToInteger(SDOT)
    out = rewrite(mod)
    # THEN all three are s8 x s8 -> s32 convolutions, the stem over 4 input channels, and each input is shifted
    # from u8 to s8 (x - 128) in int16 before it
    assert rewrite.rewritten == 3
    calls = _calls(out)
    convs = [c for c in calls if c.op.name == "relax.nn.conv2d"]
    assert [(str(c.args[0].ty.dtype), str(c.args[1].ty.dtype), str(c.attrs.out_dtype)) for c in convs] == \
        [("int8", "int8", "int32")] * 3
    assert int(convs[0].args[1].ty.shape[1]) == 4
    shifts = [c for c in calls if c.op.name == "relax.add" and str(c.ty.dtype) == "int16"]
    assert len(shifts) == 3 and all(int(c.args[1].value.numpy()) == -128 for c in shifts)


def _integer_kernels(model_dir: Path, name: str, shape: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """(the s8 x s8 -> s32 kernels Kiln's CPU graph passes and fusion make of the QDQ model for Graviton2, those
    of them the sdot schedule takes)."""
    import tvm
    from kiln_compiler.pipeline import _cpu_kernels
    from kiln_compiler.schedules.int8_arm import SdotConvSchedule
    from kiln_compiler.schedules.tir import COMM_REDUCE, DATA_PAR, match_reduction

    mod = from_onnx(onnx.load(str(model_dir / "model.onnx")), shape_dict={name: list(shape)},
                    keep_params_in_input=False)
    reductions = ([DATA_PAR] * 4 + [COMM_REDUCE] * 3, [DATA_PAR] * 4 + [COMM_REDUCE])  # NHWC conv, group matmul
    sdot = SdotConvSchedule()
    with _target(DOTPROD) as tgt:
        kernels = _cpu_kernels(mod, tgt, True)
        integer = [gv.name_hint for gv, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                   and any(match_reduction(f, list(kinds), ("int8", "int8", "int32")) is not None
                           for kinds in reductions)]
        sdot(kernels)
    return sorted(integer), sorted(sdot.scheduled)


def test_sdot_schedule_takes_every_integer_kernel(qdq_data_movement_dir: Path) -> None:
    # GIVEN the QDQ model with a 3-channel strided stem (23 output columns), 1x1 and 3x3 expands, a grouped 1x1
    # (a batched matmul) and a depthwise 3x3
    # WHEN Kiln's CPU graph passes and fusion run for Graviton2 and the sdot schedule runs on the kernels
    integer, scheduled = _integer_kernels(qdq_data_movement_dir, "input", (1, 3, 46, 46))
    # THEN the four convolutions and the grouped matmul are s8 x s8 -> s32 kernels (the depthwise one stays fp32
    # on the integers) and the sdot schedule takes every one of them
    assert len(integer) == 5 and sum("matmul" in k for k in integer) == 1, integer
    assert scheduled == integer


def _sdot_functions(asm: str) -> list[str]:
    """Names of the functions whose disassembly has an ``sdot``."""
    blocks = re.split(r"\n(?=[0-9a-f]+ <)", asm)
    return [m.group(1) for b in blocks if (m := re.match(r"[0-9a-f]+ <([^>]+)>:", b)) and "\tsdot\t" in b]


def _emulated(model_dir: Path, device: str, tmp_path: Path, name: str, x: np.ndarray,
              framework: str = "ONNX") -> tuple[np.ndarray, str]:
    """(output, disassembly of model.so) of the ``device`` artifact of ``model_dir`` run under qemu."""
    artifact = compile_artifact(model_dir, framework, device, tmp_path / device)
    root = tmp_path / device / "unpacked"
    with tarfile.open(artifact) as tar:
        tar.extractall(root, filter="data")
    (y,) = emulate.run(root, {name: x})
    return y, disassemble(root / "model.so", OBJDUMP)


def _check(model_dir: Path, tmp_path: Path, name: str, shape: tuple[int, ...], seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    integer, scheduled = _integer_kernels(model_dir, name, shape)
    assert integer and scheduled == integer  # the sdot schedule takes every integer kernel
    # WHEN compiled for Graviton2 (sdot) and for a Raspberry Pi 4 (no dotprod), both run emulated, and ONNX
    # Runtime runs the same QDQ model on this host
    out, asm = _emulated(model_dir, DOTPROD, tmp_path, name, x)
    fp32_ints, plain_asm = _emulated(model_dir, NO_DOTPROD, tmp_path, name, x)
    qdq = onnx.load(str(model_dir / "model.onnx"))
    (ref,) = reference_session(qdq.SerializeToString()).run(None, {name: x})
    # THEN the convolution kernels of the dotprod build multiply with sdot, the other build has none (it would
    # be an illegal instruction there)
    kernels = _sdot_functions(asm)
    assert len(kernels) == len(integer) and all("conv2d" in k or "matmul" in k for k in kernels), kernels
    assert "\tsdot\t" not in plain_asm
    # and its outputs equal the fp32-on-integers build's and are at most 1 quantized unit from ONNX Runtime's,
    # almost all identical (measured: identical), on an output that varies
    units = np.rint(np.abs(out.reshape(ref.shape) - ref) / _output_scale(qdq))
    print(f"\nEMULATED {DOTPROD} sdot {model_dir.parent.name}: max {units.max():.0f} units, "
          f"{np.mean(units == 0):.1%} identical, {len(kernels)} sdot kernels")
    assert units.max() <= 1 and np.mean(units == 0) >= MIN_EXACT
    np.testing.assert_array_equal(out, fp32_ints)
    assert np.ptp(ref) > 0


def test_qdq_convs_run_sdot_under_emulation(qdq_small_cnn_dir: Path, tmp_path: Path,
                                            aarch64: emulate.Emulator) -> None:  # noqa: F811
    # GIVEN the QDQ small CNN: a 3-channel 3x3 stride-2 padded stem, a 3x3 padded conv, a 1x1 conv
    _check(qdq_small_cnn_dir, tmp_path, "input", (1, 3, 32, 32), seed=21)


def test_qdq_data_movement_runs_sdot_under_emulation(qdq_data_movement_dir: Path, tmp_path: Path,
                                                     aarch64: emulate.Emulator) -> None:  # noqa: F811
    # GIVEN the QDQ model with a strided 3-channel stem, a fire module, a grouped 1x1 and a depthwise 3x3
    _check(qdq_data_movement_dir, tmp_path, "input", (1, 3, 46, 46), seed=22)


@pytest.mark.slow
def test_qdq_squeezenet_runs_sdot_under_emulation(qdq_squeezenet_dir: Path, tmp_path: Path,
                                                  aarch64: emulate.Emulator) -> None:  # noqa: F811
    # GIVEN SqueezeNet 1.0 quantized to QDQ (26 integer convolutions, 24 distinct kernels; concats, pools, softmax)
    _check(qdq_squeezenet_dir, tmp_path, "data_0", (1, 3, 224, 224), seed=23)


def test_full_integer_tflite_cnn_runs_sdot_on_its_s8_activations(tflite_int8_cnn_dir: Path, tmp_path: Path,  # noqa: F811
                                                                 aarch64: emulate.Emulator) -> None:  # noqa: F811
    # GIVEN the full-integer TFLite CNN (s8 activations, int8 in/out)
    from kiln_compiler.loaders import load_model
    from kiln_compiler.options import CompilerOptions, DataInputConfig

    loaded = load_model("TFLITE", tflite_int8_cnn_dir, DataInputConfig(), CompilerOptions())
    # WHEN the rewrite runs for sdot kernels, and the model is compiled for Graviton2 and run emulated
    rewrite = QuantizedConvToInteger(SDOT)
    calls = _calls(rewrite(loaded.mod))
    interpreter = _interpreter(tflite_int8_cnn_dir / "model.tflite")
    x = _input_for(interpreter, 31)
    y, asm = _emulated(tflite_int8_cnn_dir, DOTPROD, tmp_path, interpreter.get_input_details()[0]["name"], x,
                       "TFLITE")
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    ref = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    # THEN its three convolutions are s8 x s8 -> s32 on the activations as they are (no shift), their kernels
    # multiply with sdot, and the int8 outputs are at most one quantisation step from the interpreter's
    convs = [c for c in calls if c.op.name == "relax.nn.conv2d"]
    assert [(str(c.args[0].ty.dtype), str(c.attrs.out_dtype)) for c in convs] == [("int8", "int32")] * 3
    assert not [c for c in calls if c.op.name == "relax.add" and str(c.ty.dtype) == "int16"]
    assert len(_sdot_functions(asm)) >= 3
    assert y.dtype == ref.dtype == np.int8
    assert np.abs(y.astype(np.int32) - ref.astype(np.int32)).max() <= QUANT_STEPS
    assert np.ptp(ref.astype(np.int32)) > 10 * QUANT_STEPS
