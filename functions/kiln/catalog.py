"""The target catalog: every SageMaker ``TargetDevice`` and ``TargetPlatform`` Kiln knows.

Pure data, shared by the API (create-time validation), the workflow (which runner a job
uses) and the compiler (what TVM target and toolchain to build with). Nothing here
imports an AWS SDK or TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kiln import isa as isa_table


class Runner(StrEnum):
    """Where a job's compiler container runs (and, on a target's own hardware, measures its artifact)."""

    FARGATE = "fargate"  # ECS Fargate x86-64, whatever CPU it hands out: cross and edge targets
    BATCH_GPU = "batch-gpu"  # AWS Batch on NVIDIA instances (g4dn): NVIDIA targets
    BATCH_C4 = "batch-c4"  # AWS Batch compute environments of one instance family each, scaling to zero
    BATCH_M4 = "batch-m4"
    BATCH_C5 = "batch-c5"
    BATCH_M5 = "batch-m5"
    BATCH_C6I = "batch-c6i"
    BATCH_C6G = "batch-c6g"  # Graviton: the arm64 compiler image
    BATCH_M6G = "batch-m6g"
    BATCH_C7G = "batch-c7g"

    @property
    def spec(self) -> RunnerSpec:
        return RUNNERS[self]

    @property
    def on_target_hardware(self) -> bool:
        """Whether this runner is a fixed instance family (so it can measure targets of that family)."""
        return self.spec.instance_family is not None


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner is: the AWS service it runs on, its CPU architecture and instance family."""

    platform: str  # "ecs" (Fargate task) or "batch" (Batch job); the state machine branches on it
    architecture: str  # "x86_64" or "arm64": which compiler image it runs
    instance_family: str | None  # EC2 family of its compute environment; None = no choice (Fargate)
    gpu: bool = False
    # Where a job goes when a deployment has not enabled this runner (None: the job is refused at create).
    # Graviton families are opt-in (their arm64 image is built only when asked for): without them, Graviton
    # targets are cross-built on the generic runner as before, and their record says no measurement was made.
    fallback: Runner | None = None


# The one table of runners; CDK builds one compute environment per enabled Batch family from it.
RUNNERS: dict[Runner, RunnerSpec] = {
    Runner.FARGATE: RunnerSpec("ecs", "x86_64", None),
    Runner.BATCH_GPU: RunnerSpec("batch", "x86_64", "g4dn", gpu=True),
    Runner.BATCH_C4: RunnerSpec("batch", "x86_64", "c4"),
    Runner.BATCH_M4: RunnerSpec("batch", "x86_64", "m4"),
    Runner.BATCH_C5: RunnerSpec("batch", "x86_64", "c5"),
    Runner.BATCH_M5: RunnerSpec("batch", "x86_64", "m5"),
    Runner.BATCH_C6I: RunnerSpec("batch", "x86_64", "c6i"),
    Runner.BATCH_C6G: RunnerSpec("batch", "arm64", "c6g", fallback=Runner.FARGATE),
    Runner.BATCH_M6G: RunnerSpec("batch", "arm64", "m6g", fallback=Runner.FARGATE),
    Runner.BATCH_C7G: RunnerSpec("batch", "arm64", "c7g", fallback=Runner.FARGATE),
}
# TargetPlatform targets name no instance; an mcpu of a cloud family's CPU sends them to its runner
# (LINUX_ARM64 + neoverse-v1 is how a Graviton3 c7g job is asked for: ml_c7g is no SageMaker TargetDevice).
PLATFORM_CPU_RUNNERS: dict[tuple[str, str], Runner] = {
    ("LINUX_ARM64", "neoverse-v1"): Runner.BATCH_C7G,
    ("LINUX_ARM64", "neoverse-n1"): Runner.BATCH_C6G,
    ("LINUX_X86_64", "icelake-server"): Runner.BATCH_C6I,
    ("LINUX_X86_64", "skylake-avx512"): Runner.BATCH_C5,
}


class Family(StrEnum):
    """How a target is built; the compiler dispatches on this."""

    X86_64 = "x86_64"
    X86 = "x86"
    AARCH64 = "aarch64"
    ARMV7 = "armv7"
    CUDA = "cuda"
    WINDOWS = "windows"
    COREML = "coreml"


# The CUDA architectures (sm_XX) TVM 0.27's CUDA runtime can build kernels for: it compiles them at load
# with NVRTC 13.0 (nvidia-cuda-nvrtc 13.0.88, the CUDA of the apache-tvm 0.27 wheels), and this is what
# that library's nvrtcGetSupportedArchs reports (tests/unit/test_catalog.py asks it). CUDA 13 dropped
# Maxwell, Pascal and Volta (sm_50-sm_72), CUDA 12 Kepler (sm_37): ml_p2, ml_p3, the Jetson TX1/TX2/Nano/Xavier.
CUDA_ARCHS: tuple[int, ...] = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)
CUDA_VERSION = "13.0"

# Frameworks whose models go through TVM (neural networks) or TL2cgen (tree ensembles).
NEURAL_FRAMEWORKS = ("TENSORFLOW", "KERAS", "MXNET", "ONNX", "PYTORCH", "TFLITE", "DARKNET")
TREE_FRAMEWORKS = ("XGBOOST", "SKLEARN")
ALL_FRAMEWORKS = NEURAL_FRAMEWORKS + TREE_FRAMEWORKS
# Frameworks SageMaker accepts that this deployment's compiler cannot load yet, and why; the API
# refuses them at create time (tests/compiler checks this matches the compiler's loaders).
# Empty: every framework above has a loader (MXNET runs in its own Python 3.9 environment).
UNAVAILABLE_FRAMEWORKS: dict[str, str] = {}
# coremltools converts TensorFlow/Keras and PyTorch models only (as in SageMaker Neo).
COREML_FRAMEWORKS = ("TENSORFLOW", "KERAS", "PYTORCH")


@dataclass(frozen=True)
class Toolchain:
    """A C/C++ toolchain to link the compiled module, and how to run its output here."""

    cxx: str  # compiler driver used by tvm.support.cc / tl2cgen
    # Debian packages that provide it (and the emulator); requirements/debian.txt installs them all for
    # `make install` and the compiler image (tests/unit/test_catalog.py checks the two agree).
    debian_packages: tuple[str, ...] = ()
    emulator: str | None = None  # qemu-user binary that runs this arch's code on x86_64
    sysroot: str | None = None  # for the emulator (-L)


@dataclass(frozen=True)
class Target:
    """What one target compiles to."""

    name: str  # the TargetDevice, or a platform key such as "LINUX_ARM64_NVIDIA"
    family: Family
    description: str
    tvm_target: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] | None = None  # host target for device (CUDA) builds
    toolchain: Toolchain | None = None
    runner: Runner = Runner.FARGATE
    frameworks: tuple[str, ...] = ALL_FRAMEWORKS
    cuda_arch: str | None = None  # default sm_XX for NVIDIA devices
    instance_types: tuple[str, ...] = ()  # SageMaker hosting instance types (cloud targets)

    @property
    def is_cloud(self) -> bool:
        return bool(self.instance_types)

    @property
    def instance_family(self) -> str | None:
        """The EC2 family of a cloud target (``ml.c5.xlarge`` -> ``c5``)."""
        return self.instance_types[0].split(".")[1] if self.instance_types else None

    def measurable_on(self, runner: Runner) -> bool:
        """Whether ``runner`` is this target's hardware, so timings taken there are the target's."""
        family = runner.spec.instance_family
        return family is not None and (self.instance_family is None or self.instance_family == family)

    @property
    def cpu(self) -> isa_table.CpuFeatures | None:
        """What the target's CPU code may use (the host CPU's for GPU targets); None for Core ML."""
        llvm = self.host if self.family is Family.CUDA else self.tvm_target
        if not llvm or llvm.get("kind") != "llvm":
            return None
        return isa_table.target_features(llvm)

    @property
    def isa(self) -> tuple[str, ...]:
        """CPU features an artifact for this target needs at run time (checked by the runtime loader)."""
        return self.cpu.runtime_check if self.cpu else ()


@dataclass(frozen=True)
class UnsupportedTarget:
    """A target this deployment refuses at create time, and why."""

    name: str
    reason: str


_GCC_X86 = Toolchain(cxx="g++")
_GCC_AARCH64 = Toolchain(
    cxx="aarch64-linux-gnu-g++",
    debian_packages=("g++-aarch64-linux-gnu", "qemu-user-static"),
    emulator="qemu-aarch64-static",
    sysroot="/usr/aarch64-linux-gnu",
)
_GCC_ARMHF = Toolchain(
    cxx="arm-linux-gnueabihf-g++",
    debian_packages=("g++-arm-linux-gnueabihf", "qemu-user-static"),
    emulator="qemu-arm-static",
    sysroot="/usr/arm-linux-gnueabihf",
)
_GCC_I686 = Toolchain(cxx="i686-linux-gnu-g++", debian_packages=("g++-i686-linux-gnu", "qemu-user-static"),
                      emulator="qemu-i386-static", sysroot="/usr/i686-linux-gnu")
_MINGW64 = Toolchain(cxx="x86_64-w64-mingw32-g++", debian_packages=("g++-mingw-w64-x86-64",))
_MINGW32 = Toolchain(cxx="i686-w64-mingw32-g++", debian_packages=("g++-mingw-w64-i686",))



def _x86(name: str, mcpu: str, desc: str, instances: tuple[str, ...] = (),
         runner: Runner = Runner.FARGATE) -> Target:
    return Target(
        name=name,
        family=Family.X86_64,
        description=desc,
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu},
        toolchain=_GCC_X86,
        instance_types=instances,
        runner=runner,
    )


def _arm64(name: str, mcpu: str, desc: str, instances: tuple[str, ...] = (),
           runner: Runner = Runner.FARGATE) -> Target:
    return Target(
        name=name,
        family=Family.AARCH64,
        description=desc,
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": ["+neon"]},
        toolchain=_GCC_AARCH64,
        instance_types=instances,
        runner=runner,
    )


def _armv7(name: str, mcpu: str, desc: str) -> Target:
    return Target(
        name=name,
        family=Family.ARMV7,
        description=desc,
        tvm_target={
            "kind": "llvm",
            "mtriple": "armv7l-linux-gnueabihf",
            "mcpu": mcpu,
            "mattr": ["+neon"],
            "mfloat-abi": "hard",
        },
        toolchain=_GCC_ARMHF,
    )


def _cuda(name: str, arch: str, host: dict[str, Any], toolchain: Toolchain, desc: str,
          instances: tuple[str, ...] = ()) -> Target:
    return Target(
        name=name,
        family=Family.CUDA,
        description=desc,
        tvm_target={"kind": "cuda", "arch": arch},
        host=host,
        toolchain=toolchain,
        runner=Runner.BATCH_GPU,
        frameworks=NEURAL_FRAMEWORKS,
        cuda_arch=arch,
        instance_types=instances,
    )


_X86_HOST_AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
_X86_HOST_AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
_ARM64_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}

_DEVICES: tuple[Target, ...] = (
    # x86 cloud instances. c4/m4 are Haswell/Broadwell (AVX2); c5/m5 are Skylake-SP (AVX-512).
    _x86("ml_c4", "haswell", "EC2 C4 (Haswell, AVX2)", ("ml.c4.xlarge", "ml.c4.2xlarge", "ml.c4.4xlarge", "ml.c4.8xlarge"), Runner.BATCH_C4),
    _x86("ml_m4", "haswell", "EC2 M4 (Broadwell, AVX2)", ("ml.m4.xlarge", "ml.m4.2xlarge", "ml.m4.4xlarge", "ml.m4.10xlarge"), Runner.BATCH_M4),
    _x86("ml_c5", "skylake-avx512", "EC2 C5 (Skylake-SP, AVX-512)", ("ml.c5.xlarge", "ml.c5.2xlarge", "ml.c5.4xlarge", "ml.c5.9xlarge"), Runner.BATCH_C5),
    _x86("ml_m5", "skylake-avx512", "EC2 M5 (Skylake-SP, AVX-512)", ("ml.m5.large", "ml.m5.xlarge", "ml.m5.2xlarge", "ml.m5.4xlarge"), Runner.BATCH_M5),
    # Lambda's x86 fleet guarantees AVX2, not AVX-512.
    _x86("lambda", "haswell", "AWS Lambda (x86_64, AVX2)"),
    _x86("sbe_c", "haswell", "Snowball Edge Compute (x86_64, AVX2)"),
    _x86("deeplens", "x86-64", "AWS DeepLens (Intel Atom, CPU only)"),
    # Graviton2.
    _arm64("ml_c6g", "neoverse-n1", "EC2 C6g (Graviton2)", ("ml.c6g.large", "ml.c6g.xlarge", "ml.c6g.2xlarge", "ml.c6g.4xlarge"), Runner.BATCH_C6G),
    _arm64("ml_m6g", "neoverse-n1", "EC2 M6g (Graviton2)", ("ml.m6g.large", "ml.m6g.xlarge", "ml.m6g.2xlarge", "ml.m6g.4xlarge"), Runner.BATCH_M6G),
    # NVIDIA cloud GPUs (x86 hosts) and Jetson modules (aarch64 hosts).
    _cuda("ml_p2", "sm_37", {**_X86_HOST_AVX2, "mcpu": "broadwell"}, _GCC_X86, "EC2 P2 (K80)", ("ml.p2.xlarge", "ml.p2.8xlarge")),
    _cuda("ml_p3", "sm_70", {**_X86_HOST_AVX2, "mcpu": "broadwell"}, _GCC_X86, "EC2 P3 (V100)", ("ml.p3.2xlarge", "ml.p3.8xlarge")),
    _cuda("ml_g4dn", "sm_75", _X86_HOST_AVX512, _GCC_X86, "EC2 G4dn (T4)", ("ml.g4dn.xlarge", "ml.g4dn.2xlarge", "ml.g4dn.4xlarge")),
    _cuda("jetson_tx1", "sm_53", {**_ARM64_HOST, "mcpu": "cortex-a57"}, _GCC_AARCH64, "Jetson TX1"),
    _cuda("jetson_tx2", "sm_62", {**_ARM64_HOST, "mcpu": "cortex-a57"}, _GCC_AARCH64, "Jetson TX2"),
    _cuda("jetson_nano", "sm_53", {**_ARM64_HOST, "mcpu": "cortex-a57"}, _GCC_AARCH64, "Jetson Nano"),
    _cuda("jetson_xavier", "sm_72", {**_ARM64_HOST, "mcpu": "carmel"}, _GCC_AARCH64, "Jetson AGX Xavier"),
    # ARM edge boards (CPU).
    _armv7("rasp3b", "cortex-a53", "Raspberry Pi 3 Model B (32-bit OS, armv7 hard-float)"),
    _arm64("rasp4b", "cortex-a72", "Raspberry Pi 4 Model B (64-bit OS)"),
    _arm64("rk3399", "cortex-a72", "Rockchip RK3399 (CPU)"),
    _armv7("rk3288", "cortex-a17", "Rockchip RK3288 (armv7 hard-float)"),
    _arm64("imx8qm", "cortex-a72", "NXP i.MX 8QuadMax (CPU)"),
    _arm64("imx8mplus", "cortex-a53", "NXP i.MX 8M Plus (CPU)"),
    _arm64("jacinto_tda4vm", "cortex-a72", "TI Jacinto TDA4VM (CPU)"),
    _armv7("sitara_am57x", "cortex-a15", "TI Sitara AM57x (armv7 hard-float)"),
    _arm64("aisage", "cortex-a53", "AISage (CPU)"),
    # Windows, cross-linked with mingw-w64.
    Target(
        name="x86_win64",
        family=Family.WINDOWS,
        description="Windows x86-64 (AVX2)",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-pc-windows-gnu", "mcpu": "haswell"},
        toolchain=_MINGW64,
    ),
    Target(
        name="x86_win32",
        family=Family.WINDOWS,
        # Tree models only: neural networks need tvm_ffi.dll, which exists for 64-bit Windows only.
        description="Windows x86 32-bit (tree ensembles; no 32-bit Windows TVM runtime exists)",
        tvm_target={"kind": "llvm", "mtriple": "i686-pc-windows-gnu", "mcpu": "pentium4"},
        toolchain=_MINGW32,
        frameworks=TREE_FRAMEWORKS,
    ),
    Target(
        name="coreml",
        family=Family.COREML,
        description="Apple Core ML (.mlpackage via coremltools)",
        frameworks=COREML_FRAMEWORKS,
    ),
)

_UNSUPPORTED: tuple[UnsupportedTarget, ...] = (
    UnsupportedTarget("ml_inf1", "AWS Inferentia needs the Neuron compiler, which this deployment does not ship"),
    UnsupportedTarget("ml_inf2", "AWS Inferentia2 needs the Neuron compiler, which this deployment does not ship"),
    UnsupportedTarget("ml_trn1", "AWS Trainium needs the Neuron compiler, which this deployment does not ship"),
    UnsupportedTarget("ml_eia2", "Elastic Inference is retired and needs its own TensorFlow/MXNet builds"),
    UnsupportedTarget("qcs605", "Qualcomm QCS605 needs the Hexagon DSP SDK, which this deployment does not ship"),
    UnsupportedTarget("qcs603", "Qualcomm QCS603 needs the Hexagon DSP SDK, which this deployment does not ship"),
    UnsupportedTarget("amba_cv2", "Ambarella CVflow needs Ambarella's toolchain, which this deployment does not ship"),
    UnsupportedTarget("amba_cv22", "Ambarella CVflow needs Ambarella's toolchain, which this deployment does not ship"),
    UnsupportedTarget("amba_cv25", "Ambarella CVflow needs Ambarella's toolchain, which this deployment does not ship"),
)


class TargetCatalog:
    """Look up targets by ``TargetDevice`` or ``TargetPlatform``."""

    def __init__(self, devices: tuple[Target, ...] = _DEVICES,
                 unsupported: tuple[UnsupportedTarget, ...] = _UNSUPPORTED) -> None:
        self._devices = {t.name: t for t in devices}
        self._unsupported = {u.name: u for u in unsupported}

    @property
    def supported_devices(self) -> list[str]:
        return sorted(self._devices)

    def device(self, name: str) -> Target:
        """The target for a ``TargetDevice``; ``UnsupportedTargetError`` when refused."""
        if name in self._unsupported:
            raise UnsupportedTargetError(name, self._unsupported[name].reason, self.supported_devices)
        try:
            return self._devices[name]
        except KeyError:
            raise UnsupportedTargetError(name, "unknown target device", self.supported_devices) from None

    @property
    def supported_platforms(self) -> dict[str, Target]:
        """Every accepted TargetPlatform, by key (``LINUX_ARM64``, ``LINUX_X86_64_NVIDIA``, ...)."""
        return dict(sorted(self._platforms().items()))

    def platform(self, os: str, arch: str, accelerator: str | None = None) -> Target:
        """The target for a ``TargetPlatform`` (Os, Arch, optional Accelerator)."""
        key = "_".join(p for p in (os, arch, accelerator) if p)
        supported = sorted(self._platforms())
        if os == "ANDROID":
            raise UnsupportedTargetError(
                key, "ANDROID targets need the Android NDK, which this deployment does not ship", supported
            )
        if accelerator in ("MALI", "INTEL_GRAPHICS", "NNA"):
            raise UnsupportedTargetError(
                key, f"the {accelerator} accelerator is not supported; omit Accelerator to compile for the CPU",
                supported,
            )
        try:
            return self._platforms()[key]
        except KeyError:
            raise UnsupportedTargetError(key, "unsupported platform combination", supported) from None

    def for_output_config(self, output_config: dict[str, Any]) -> Target:
        """The target named by an ``OutputConfig`` (TargetDevice or TargetPlatform)."""
        if output_config.get("TargetDevice"):
            return self.device(output_config["TargetDevice"])
        p = output_config["TargetPlatform"]
        return self.platform(p["Os"], p["Arch"], p.get("Accelerator"))

    @staticmethod
    def runner_for(target: Target, mcpu: str | None = None) -> Runner:
        """Where a job for ``target`` runs: its own runner, or for a TargetPlatform whose CompilerOptions
        ``mcpu`` is a cloud family's CPU, that family's runner."""
        if mcpu and not target.is_cloud:
            return PLATFORM_CPU_RUNNERS.get((target.name, mcpu), target.runner)
        return target.runner

    @staticmethod
    def _platforms() -> dict[str, Target]:
        x86 = _x86("LINUX_X86_64", "x86-64-v3", "Linux x86-64 (mcpu from CompilerOptions, default AVX2)")
        return {
            "LINUX_X86_64": x86,
            "LINUX_X86": Target(
                name="LINUX_X86",
                family=Family.X86,
                # Tree models only, as x86_win32: no 32-bit Linux TVM runtime (tvm-ffi wheel) exists.
                description="Linux x86 32-bit (tree ensembles; no 32-bit Linux TVM runtime exists)",
                tvm_target={"kind": "llvm", "mtriple": "i686-linux-gnu", "mcpu": "pentium4"},
                toolchain=_GCC_I686,
                frameworks=TREE_FRAMEWORKS,
            ),
            "LINUX_ARM64": _arm64("LINUX_ARM64", "generic", "Linux ARM64 (mcpu from CompilerOptions)"),
            "LINUX_ARM_EABIHF": _armv7("LINUX_ARM_EABIHF", "generic", "Linux ARMv7 hard-float"),
            "LINUX_X86_64_NVIDIA": _cuda(
                "LINUX_X86_64_NVIDIA", "", _X86_HOST_AVX2, _GCC_X86, "Linux x86-64 + NVIDIA GPU (gpu-code required)"
            ),
            "LINUX_ARM64_NVIDIA": _cuda(
                "LINUX_ARM64_NVIDIA", "", _ARM64_HOST, _GCC_AARCH64, "Linux ARM64 + NVIDIA GPU (gpu-code required)"
            ),
        }


class UnsupportedTargetError(Exception):
    """A target this deployment cannot compile for."""

    def __init__(self, target: str, reason: str, supported: list[str]) -> None:
        self.target = target
        self.reason = reason
        self.supported = supported
        super().__init__(f"Target '{target}' is not supported by this deployment: {reason}. "
                         f"Supported: {', '.join(supported)}")
