"""Which catalog target matches this machine (``--target-device host``, the demo, the bench).

Uses the catalog's public data and kiln.isa's rule: a cloud CPU target of this host's
architecture whose code this CPU can run, the widest vectors first (AVX-512 before AVX2), then
the most features, then by name (``ml_c5`` before ``ml_m5``).
"""

from __future__ import annotations

from kiln import isa
from kiln.catalog import Family, Target, TargetCatalog

HOST = "host"  # the --target-device value that asks for this machine's target

_CPU_FAMILIES = (Family.X86_64, Family.AARCH64, Family.ARMV7)


class NoHostTargetError(Exception):
    """No catalog target can run on this machine."""


def matching_target(catalog: TargetCatalog, machine: str, flags: set[str] | None) -> Target:
    """The widest-ISA cloud target that a ``machine`` whose CPU reports ``flags`` runs."""
    candidates = []
    for name in catalog.supported_devices:
        target = catalog.device(name)
        cpu = target.cpu
        if target.family in _CPU_FAMILIES and target.is_cloud and cpu is not None \
                and isa.host_can_run(cpu, machine, flags):
            candidates.append((-cpu.vector_lanes, -len(cpu.features), name, target))
    if not candidates:
        widest = isa.vector_isa_name(flags or ())
        raise NoHostTargetError(
            f"no catalog cloud target runs on this host ({machine}, widest vectors: {widest}); "
            f"pass --target-device with one of: {', '.join(catalog.supported_devices)}")
    return min(candidates, key=lambda c: c[:3])[3]


def host_target(catalog: TargetCatalog | None = None) -> Target:
    """The catalog target matching the machine this code runs on."""
    from kiln.runtime import cpu_flags, host_machine

    return matching_target(catalog or TargetCatalog(), host_machine(), cpu_flags())



def target_isa_label(target: Target) -> str:
    """The widest vector extension of a catalog target's CPU code (AVX-512, AVX2, NEON, ...)."""
    return isa.vector_isa_name(target.cpu.features if target.cpu else ())
