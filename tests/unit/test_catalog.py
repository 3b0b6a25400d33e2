"""The target catalog: every TargetDevice / TargetPlatform and how it compiles."""

from __future__ import annotations

from pathlib import Path

import botocore.session
import pytest
from kiln.catalog import (
    CUDA_ARCHS,
    CUDA_VERSION,
    Family,
    Runner,
    Target,
    TargetCatalog,
    UnsupportedTargetError,
)

CATALOG = TargetCatalog()
MODEL = botocore.session.get_session().get_service_model("sagemaker")
DEVICE_ENUM = MODEL.shape_for("TargetDevice").enum
UNSUPPORTED = {"ml_inf1", "ml_inf2", "ml_trn1", "ml_eia2", "qcs605", "qcs603", "amba_cv2", "amba_cv22", "amba_cv25"}


def test_every_botocore_device_is_either_supported_or_refused() -> None:
    # GIVEN every TargetDevice botocore's model knows
    # WHEN each is looked up
    supported, refused = set(), set()
    for device in DEVICE_ENUM:
        try:
            CATALOG.device(device)
            supported.add(device)
        except UnsupportedTargetError as exc:
            assert exc.reason != "unknown target device", device
            refused.add(device)
    # THEN the refused ones are exactly the accelerator/DSP targets, and the rest are the catalog's devices
    assert refused == UNSUPPORTED
    assert supported == set(CATALOG.supported_devices)


@pytest.mark.parametrize("device", sorted(set(DEVICE_ENUM) - UNSUPPORTED))
def test_supported_device_has_a_complete_build_recipe(device: str) -> None:
    # GIVEN a supported device
    # WHEN it is looked up
    target = CATALOG.device(device)
    # THEN it names its family, and a TVM target plus toolchain unless it is CoreML
    assert target.name == device
    if target.family is Family.COREML:
        assert target.frameworks == ("TENSORFLOW", "KERAS", "PYTORCH")
        return
    assert target.tvm_target["kind"] in ("llvm", "cuda")
    assert target.toolchain is not None and target.toolchain.cxx
    if target.family is Family.CUDA:
        assert target.runner is Runner.BATCH_GPU and target.cuda_arch and target.host is not None
        assert "XGBOOST" not in target.frameworks
    elif target.is_cloud:
        # a cloud CPU target is built and measured on a compute environment of its own instance family
        assert target.runner.spec.platform == "batch" and target.runner.spec.instance_family == target.instance_family
        assert target.measurable_on(target.runner)
    else:
        # cross and edge targets: the generic Fargate runner, which is nobody's hardware
        assert target.runner is Runner.FARGATE and not target.measurable_on(target.runner)


@pytest.mark.parametrize(("device", "family", "detail"), [
    ("ml_c4", Family.X86_64, {"mcpu": "haswell"}),
    ("ml_c5", Family.X86_64, {"mcpu": "skylake-avx512"}),
    ("ml_c6g", Family.AARCH64, {"mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}),
    ("rasp3b", Family.ARMV7, {"mtriple": "armv7l-linux-gnueabihf", "mfloat-abi": "hard"}),
    ("ml_g4dn", Family.CUDA, {"kind": "cuda", "arch": "sm_75"}),
    ("jetson_tx2", Family.CUDA, {"arch": "sm_62"}),
    ("jetson_xavier", Family.CUDA, {"arch": "sm_72"}),
    ("x86_win64", Family.WINDOWS, {"mtriple": "x86_64-pc-windows-gnu"}),
])
def test_devices_compile_to_the_expected_tvm_target(device: str, family: Family, detail: dict[str, str]) -> None:
    # GIVEN a well-known device / WHEN looked up / THEN its TVM target carries the expected settings
    target = CATALOG.device(device)
    assert target.family is family
    assert detail.items() <= target.tvm_target.items()


def test_isa_requirements_of_x86_targets() -> None:
    # GIVEN x86 cloud targets / WHEN looked up / THEN AVX-512 only where the hardware has it
    assert "avx512f" in CATALOG.device("ml_c5").isa and "avx512f" in CATALOG.device("ml_m5").isa
    assert "avx512f" not in CATALOG.device("ml_c4").isa and "avx2" in CATALOG.device("ml_c4").isa
    assert CATALOG.device("ml_c4").is_cloud and not CATALOG.device("rasp3b").is_cloud


@pytest.mark.parametrize(("os", "arch", "accelerator", "name", "family"), [
    ("LINUX", "X86_64", None, "LINUX_X86_64", Family.X86_64),
    ("LINUX", "X86", None, "LINUX_X86", Family.X86),
    ("LINUX", "ARM64", None, "LINUX_ARM64", Family.AARCH64),
    ("LINUX", "ARM_EABIHF", None, "LINUX_ARM_EABIHF", Family.ARMV7),
    ("LINUX", "X86_64", "NVIDIA", "LINUX_X86_64_NVIDIA", Family.CUDA),
    ("LINUX", "ARM64", "NVIDIA", "LINUX_ARM64_NVIDIA", Family.CUDA),
])
def test_supported_platforms(os: str, arch: str, accelerator: str | None, name: str, family: Family) -> None:
    # GIVEN a TargetPlatform combination / WHEN looked up / THEN it maps to its catalog target
    target = CATALOG.platform(os, arch, accelerator)
    assert (target.name, target.family) == (name, family)
    config = {"S3OutputLocation": "s3://b/o", "TargetPlatform": {"Os": os, "Arch": arch}}
    if accelerator:
        config["TargetPlatform"]["Accelerator"] = accelerator
    assert CATALOG.for_output_config(config).name == name


@pytest.mark.parametrize(("os", "arch", "accelerator", "reason"), [
    ("ANDROID", "ARM64", None, "Android NDK"),
    ("ANDROID", "ARM_EABI", None, "Android NDK"),
    ("ANDROID", "X86_64", None, "Android NDK"),
    ("LINUX", "ARM64", "MALI", "MALI accelerator"),
    ("LINUX", "X86_64", "INTEL_GRAPHICS", "INTEL_GRAPHICS accelerator"),
    ("LINUX", "ARM64", "NNA", "NNA accelerator"),
    ("LINUX", "ARM_EABI", None, "unsupported platform combination"),
    ("LINUX", "X86", "NVIDIA", "unsupported platform combination"),
])
def test_unsupported_platforms_name_reason_and_alternatives(os: str, arch: str, accelerator: str | None,
                                                            reason: str) -> None:
    # GIVEN a platform this deployment cannot compile for
    # WHEN it is looked up
    with pytest.raises(UnsupportedTargetError) as info:
        CATALOG.platform(os, arch, accelerator)
    # THEN the error names the platform key, why, and every supported platform
    message = str(info.value)
    assert info.value.target == "_".join(p for p in (os, arch, accelerator) if p)
    assert reason in message
    assert "LINUX_ARM64, LINUX_ARM64_NVIDIA, LINUX_ARM_EABIHF, LINUX_X86, LINUX_X86_64, LINUX_X86_64_NVIDIA" in message


def test_for_output_config_prefers_target_device() -> None:
    # GIVEN an OutputConfig naming a device / WHEN resolved / THEN the device's target is used
    assert CATALOG.for_output_config({"TargetDevice": "rk3399"}).name == "rk3399"


def test_unknown_device_is_refused_with_supported_list() -> None:
    # GIVEN a device name outside botocore's enum (as a direct caller could pass)
    with pytest.raises(UnsupportedTargetError) as info:
        CATALOG.device("ml_z9")
    # THEN it is refused as unknown, listing the supported devices
    assert info.value.reason == "unknown target device"
    assert info.value.supported == CATALOG.supported_devices


def _every_target() -> list[Target]:
    platforms = [("LINUX", "X86_64", None), ("LINUX", "X86", None), ("LINUX", "ARM64", None),
                 ("LINUX", "ARM_EABIHF", None), ("LINUX", "X86_64", "NVIDIA"), ("LINUX", "ARM64", "NVIDIA")]
    return [CATALOG.device(d) for d in CATALOG.supported_devices] + [CATALOG.platform(*p) for p in platforms]


def test_every_toolchain_is_installed_by_make_install_and_the_image() -> None:
    # GIVEN the Debian packages requirements/debian.txt installs (make install and both Dockerfiles read it)
    root = Path(__file__).resolve().parents[2]
    installed = {ln.strip() for ln in (root / "requirements/debian.txt").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")}
    # WHEN every target's toolchain says which packages it needs
    needed = {(t.name, p) for t in _every_target() if t.toolchain for p in t.toolchain.debian_packages}
    # THEN each is installed: a target is accepted at create only if its toolchain ships
    assert needed and {p for _, p in needed} <= installed, sorted(n for n in needed if n[1] not in installed)
    for target in _every_target():
        assert target.toolchain is None or target.toolchain.cxx == "g++" or target.toolchain.debian_packages, \
            f"{target.name}: a cross toolchain must say which Debian packages provide it"


def test_every_cpu_target_has_isa_data() -> None:
    # GIVEN every target  WHEN its CPU is looked up in kiln.isa  THEN it is known (x86 ones list their features)
    for target in _every_target():
        if target.family.value == "coreml":
            assert target.cpu is None
            continue
        assert target.cpu is not None and target.cpu.vector_lanes in (4, 8, 16), target.name
        if target.cpu.arch.value == "x86_64" and target.tvm_target.get("mcpu") not in ("x86-64",):
            assert "avx2" in target.isa or target.family is Family.CUDA, target.name


@pytest.mark.parametrize("device", sorted(set(DEVICE_ENUM) - UNSUPPORTED))
def test_every_target_has_a_runner_of_a_matching_architecture(device: str) -> None:
    # GIVEN a supported device  WHEN its runner is looked up
    target = CATALOG.device(device)
    runner = CATALOG.runner_for(target)
    # THEN the runner is in the one runner table, and a runner that measures runs the target's own architecture
    assert runner.spec is not None
    if target.measurable_on(runner) and target.family is Family.AARCH64:
        assert runner.spec.architecture == "arm64"
    if target.measurable_on(runner) and target.family is Family.X86_64:
        assert runner.spec.architecture == "x86_64"


@pytest.mark.parametrize(("device", "runner"), [
    ("ml_c6g", Runner.BATCH_C6G), ("ml_m6g", Runner.BATCH_M6G), ("ml_c5", Runner.BATCH_C5),
    ("ml_m5", Runner.BATCH_M5), ("ml_c4", Runner.BATCH_C4), ("ml_g4dn", Runner.BATCH_GPU),
    ("rasp4b", Runner.FARGATE), ("deeplens", Runner.FARGATE), ("coreml", Runner.FARGATE),
])
def test_graviton_on_arm64_families_and_edge_targets_on_the_generic_runner(device: str, runner: Runner) -> None:
    # GIVEN a device  WHEN its runner is looked up  THEN Graviton runs on arm64 Batch families, x86 cloud
    # families on their own, edge and cross targets on the generic Fargate runner
    assert CATALOG.runner_for(CATALOG.device(device)) is runner
    if device in ("ml_c6g", "ml_m6g"):
        assert runner.spec.architecture == "arm64"


def test_platform_target_with_a_cloud_cpu_goes_to_that_family() -> None:
    # GIVEN TargetPlatform LINUX/ARM64 (ml_c7g is no SageMaker TargetDevice: Graviton3 is asked for by mcpu)
    arm64 = CATALOG.platform("LINUX", "ARM64")
    # WHEN the runner is decided with and without Graviton3's mcpu
    # THEN neoverse-v1 runs on the c7g family (arm64, measurable); other CPUs stay on the generic runner
    assert CATALOG.runner_for(arm64, "neoverse-v1") is Runner.BATCH_C7G
    assert Runner.BATCH_C7G.spec.architecture == "arm64" and arm64.measurable_on(Runner.BATCH_C7G)
    assert CATALOG.runner_for(arm64, "cortex-a72") is Runner.FARGATE
    assert CATALOG.runner_for(arm64) is Runner.FARGATE
    assert CATALOG.runner_for(CATALOG.platform("LINUX", "X86_64"), "icelake-server") is Runner.BATCH_C6I


def test_gpu_runner_measures_only_its_own_gpu_family() -> None:
    # GIVEN the GPU runner (g4dn instances)  THEN a g4dn job is measurable there and a V100 (p3) job is not
    assert CATALOG.device("ml_g4dn").measurable_on(Runner.BATCH_GPU)
    assert not CATALOG.device("ml_p3").measurable_on(Runner.BATCH_GPU)


def test_cuda_architectures_are_those_the_pinned_nvrtc_compiles_for() -> None:
    # GIVEN the pinned NVRTC (nvidia-cuda-nvrtc, requirements/runtime-cuda.txt), which TVM 0.27's CUDA runtime
    # compiles kernels with when an artifact loads; asking it needs no GPU
    from kiln_runtime import cuda_jit

    # WHEN it is asked which compute capabilities it targets
    version, archs = cuda_jit.supported_archs()
    # THEN the catalog's fact is exactly its answer, and the GPUs the catalog names follow from it
    assert f"{version[0]}.{version[1]}" == CUDA_VERSION
    assert tuple(archs) == CUDA_ARCHS
    unrunnable = sorted(d for d in CATALOG.supported_devices
                        if CATALOG.device(d).cuda_arch and int(CATALOG.device(d).cuda_arch[3:]) not in archs)
    assert unrunnable == ["jetson_nano", "jetson_tx1", "jetson_tx2", "jetson_xavier", "ml_p2", "ml_p3"]
