"""The runtime the server loads artifacts with: the slim ``kiln_runtime`` package where it is
installed (the serving images), else ``kiln.runtime`` from the full Kiln install. The server uses
only the public API both share: ``load(path)`` -> model with ``.inputs``, ``.outputs``, ``.run``,
``.manifest``, and ``IncompatibleHostError``."""

from __future__ import annotations

try:
    import kiln_runtime as runtime
except ModuleNotFoundError:
    from kiln import runtime  # type: ignore[no-redef]

__all__ = ["runtime"]
