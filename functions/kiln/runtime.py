"""Load and run a Kiln artifact: ``kiln.runtime.load(path).run({name: array})``.

One implementation: this module re-exports the ``kiln-runtime`` package (``runtime/`` in the
repository, ``kiln_runtime`` on import), which a deployment host installs on its own without Kiln.
"""

from kiln_runtime import (
    MANIFEST,
    ArtifactError,
    IncompatibleHostError,
    Model,
    RuntimeLibraryError,
    TensorSpec,
    check_host,
    cpu_flags,
    host_machine,
    load,
    normalise_machine,
    read_manifest,
)

__all__ = ["MANIFEST", "ArtifactError", "IncompatibleHostError", "Model", "RuntimeLibraryError", "TensorSpec",
           "check_host", "cpu_flags", "host_machine", "load", "normalise_machine", "read_manifest"]
