"""How each target create accepts is built, and how Kiln's tests execute its artifacts.

One table for the README's target section (scripts/target_table.py writes it, a test checks it) and for
tests/runtime/test_targets.py, which runs the tiny model on every target this table calls ``native`` or
``emulated``: a claim here is a test there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kiln.catalog import CUDA_VERSION, Family, Target, TargetCatalog
from kiln.rules import cuda_arch_supported


class Execution(StrEnum):
    """How the tests execute a target's artifacts."""

    NATIVE = "native"  # on the x86-64 test host, in process
    EMULATED = "emulated"  # under qemu-user with that machine's kiln-runtime (kiln run --emulate)
    GPU_CHECK = "GPU check"  # scripts/gpu-check on a machine with an NVIDIA GPU (CI has none)
    NONE = "not at all"


# CUDA architectures the gpu-check bundle carries (scripts/gpu_check_bundle.py); the TargetPlatform
# LINUX_X86_64_NVIDIA is bundled for sm_80, sm_86 and sm_90 through CompilerOptions gpu-code.
GPU_CHECKED = {"ml_g4dn": "sm_75", "LINUX_X86_64_NVIDIA": "gpu-code sm_80, sm_86, sm_90"}


@dataclass(frozen=True)
class TargetRow:
    """One line of the target table."""

    name: str
    kind: str  # "TargetDevice" or "TargetPlatform"
    description: str
    built: str
    execution: Execution
    note: str


def execution(target: Target) -> tuple[Execution, str]:
    """How the tests execute ``target``'s artifacts, and what qualifies that."""
    if target.family == Family.X86_64:
        needs = " on a host with AVX-512 (skipped elsewhere)" if "avx512f" in target.isa else ""
        return Execution.NATIVE, f"kiln-runtime in process{needs}; a network and a tree model"
    if target.family == Family.AARCH64:
        return Execution.EMULATED, "qemu-aarch64 + the aarch64 kiln-runtime wheel; a network and a tree model"
    if target.family == Family.ARMV7:
        trees = ("tree models run under qemu-arm through a C harness" if target.name == "rasp3b"
                 else "tree models are built as for rasp3b")
        return Execution.NONE, ("networks: no armv7 TVM runtime library exists (apache-tvm has no armv7 wheel and no "
                                f"sdist; its wheels' runtime sources lack TVM's support headers: ADR 0024); {trees}")
    if target.family == Family.CUDA:
        if target.name in GPU_CHECKED:
            return Execution.GPU_CHECK, f"{GPU_CHECKED[target.name]}; prepared, not yet run on a GPU"
        if target.cuda_arch and not cuda_arch_supported(target.cuda_arch):
            return Execution.NONE, (f"refused at create: {target.cuda_arch} is not among the architectures "
                                    f"CUDA {CUDA_VERSION}'s NVRTC (TVM 0.27's CUDA runtime) compiles for")
        return Execution.NONE, "no aarch64 GPU machine"
    if target.family == Family.WINDOWS:
        if target.name == "x86_win64":
            return Execution.NONE, "built and inspected (PE32+ DLL), also as a job in local mode; no Windows host"
        return Execution.NONE, "tree ensembles only; no Windows host"
    if target.family == Family.COREML:
        return Execution.NONE, "converted and inspected on Linux; Core ML runs only on Apple devices"
    return Execution.NONE, "no i686 TVM runtime library exists"


def _built(target: Target) -> str:
    if target.family == Family.COREML:
        return "coremltools ML Program (.mlpackage)"
    tvm = target.tvm_target
    if target.family == Family.CUDA:
        host = target.host or {}
        arch = target.cuda_arch or "gpu-code"
        how = f"TVM cuda {arch} (kernels compiled at load), host {host.get('mtriple')}"
    else:
        how = f"TVM llvm {tvm.get('mtriple')} {tvm.get('mcpu')}"
        if target.family.value in ("x86_64", "aarch64", "armv7", "x86", "windows"):
            how += "; trees: TL2cgen" if "XGBOOST" in target.frameworks else ""
    if target.toolchain is not None:
        how += f"; {target.toolchain.cxx}"
    if "ONNX" not in target.frameworks:
        how = "TL2cgen (tree ensembles only); " + (target.toolchain.cxx if target.toolchain else "")
    return how


def rows(catalog: TargetCatalog | None = None) -> list[TargetRow]:
    """Every TargetDevice and TargetPlatform the catalog accepts."""
    catalog = catalog or TargetCatalog()
    targets = [("TargetDevice", catalog.device(n)) for n in catalog.supported_devices]
    targets += [("TargetPlatform", t) for t in catalog.supported_platforms.values()]
    out = []
    for kind, target in targets:
        how, note = execution(target)
        out.append(TargetRow(target.name, kind, target.description, _built(target), how, note))
    return out


def markdown_table(catalog: TargetCatalog | None = None) -> str:
    """The README's target table."""
    lines = ["| target | kind | device | how it is built | executed in tests | notes |",
             "|---|---|---|---|---|---|"]
    for r in rows(catalog):
        lines.append(f"| `{r.name}` | {r.kind} | {r.description} | {r.built} | {r.execution} | {r.note} |")
    return "\n".join(lines) + "\n"
