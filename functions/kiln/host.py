"""Which catalog target matches this machine (``--target-device host``, the demo, the bench).

Uses the catalog's public data only: a cloud target of this host's architecture whose ISA this
CPU has, the widest such ISA first (AVX-512 before AVX2), then by name (``ml_c5`` before ``ml_m5``).
"""

from __future__ import annotations

from kiln.catalog import Family, Target, TargetCatalog

HOST = "host"  # the --target-device value that asks for this machine's target

_FAMILY_OF_MACHINE = {"x86_64": Family.X86_64, "aarch64": Family.AARCH64}


class NoHostTargetError(Exception):
    """No catalog target can run on this machine."""


def matching_target(catalog: TargetCatalog, machine: str, flags: set[str] | None) -> Target:
    """The widest-ISA cloud target of ``machine`` that a CPU with ``flags`` runs."""
    family = _FAMILY_OF_MACHINE.get(machine)
    have = flags or set()
    candidates = [t for t in (catalog.device(name) for name in catalog.supported_devices)
                  if family is not None and t.family is family and t.is_cloud and set(t.isa) <= have]
    if not candidates:
        raise NoHostTargetError(
            f"no catalog target matches this host ({machine}"
            f"{', CPU features ' + ' '.join(sorted(f for f in have if f.startswith(('avx', 'fma')))) if have else ''}); "
            f"pass --target-device with one of: {', '.join(catalog.supported_devices)}")
    return min(candidates, key=lambda t: (-len(t.isa), t.name))


def host_target(catalog: TargetCatalog | None = None) -> Target:
    """The catalog target matching the machine this code runs on."""
    from kiln.runtime import cpu_flags, host_machine

    return matching_target(catalog or TargetCatalog(), host_machine(), cpu_flags())
