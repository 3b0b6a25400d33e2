"""kiln-runtime: load and run a Kiln artifact, ``kiln_runtime.load(path).run({name: array})``.

The artifact's ``manifest.json`` says what the library needs (machine, CPU features, CUDA);
``load`` checks this host first and raises :class:`IncompatibleHostError` naming what is
missing. TVM's runtime library is loaded only when a TVM artifact is, and TVM's compiler never.
"""

from .host import IncompatibleHostError, check_host, cpu_flags, host_machine, normalise_machine
from .manifest import MANIFEST, ArtifactError, TensorSpec, read_manifest
from .model import Model, load
from .tvm_lib import RuntimeLibraryError

__all__ = ["MANIFEST", "ArtifactError", "IncompatibleHostError", "Model", "RuntimeLibraryError", "TensorSpec",
           "check_host", "cpu_flags", "host_machine", "load", "normalise_machine", "read_manifest"]
__version__ = "0.1.0"
