"""The runtime the server loads artifacts with: the slim ``kiln_runtime`` package where it is
installed (the serving images, once it ships), else ``kiln.runtime`` from the full Kiln install. The
server uses only the public API both share: ``load(path)`` -> model with ``.inputs``, ``.outputs``,
``.run({name: array})``, ``.manifest``, and ``IncompatibleHostError``."""

from __future__ import annotations

import importlib
from types import ModuleType


def _runtime() -> ModuleType:
    try:
        return importlib.import_module("kiln_runtime")
    except ModuleNotFoundError:
        return importlib.import_module("kiln.runtime")


runtime = _runtime()
