"""Kiln's compiler: ``compile_model`` (a typed library call) with the job adapter (``job``) on top.

Layers, each importing only those before it: options/errors -> loaders -> graph -> schedules ->
tuning -> pipeline -> backends -> compile -> package -> job -> __main__ (the container entrypoint).
"""

from .compile import BuildResult, compile_model
from .options import CompilerOptions

__all__ = ["BuildResult", "CompilerOptions", "compile_model"]
