"""The TL2cgen backend: a Treelite model compiled to C and linked with the target's toolchain."""

from __future__ import annotations

import logging
import os

from kiln.catalog import Family

from ..errors import ServerError
from ..loaders import load_model
from ..options import DataInputConfig
from .base import LIB_NAMES, BuildResult, CompileRequest, effective_target, first_line

log = logging.getLogger(__name__)


def _c_compiler(cxx: str) -> str:
    return cxx[:-3] + "gcc" if cxx.endswith("g++") else cxx


def compile(request: CompileRequest) -> BuildResult:
    """Load the tree ensemble and export it as a shared library for the target's CPU."""
    import tl2cgen

    target, options = request.target, request.options
    if target.toolchain is None:
        raise ServerError(f"target {target.name} has no toolchain in the catalog")
    config = DataInputConfig.parse(request.data_input_config, request.framework, target)
    with request.stage("load"):
        model = load_model(request.framework, request.model_dir, config, options)
    request.out_dir.mkdir(parents=True, exist_ok=True)
    lib = request.out_dir / LIB_NAMES.get(target.family, "model.so")
    flags = ["-O3"]
    if options.mcpu:  # checked against the target's architecture by kiln.rules
        flags.append(f"-mcpu={options.mcpu}" if target.family in (Family.AARCH64, Family.ARMV7)
                     else f"-march={options.mcpu}")
    if target.family == Family.ARMV7:
        flags.append("-mfloat-abi=hard")
    with request.stage("build"):
        try:
            tl2cgen.export_lib(model.tree_model, toolchain=_c_compiler(target.toolchain.cxx), libpath=str(lib),
                               params={"parallel_comp": min(os.cpu_count() or 1, 8)}, options=flags,
                               nthread=os.cpu_count() or 1)
        except Exception as exc:
            log.exception("tl2cgen export failed")
            raise ServerError(f"building the tree model for {target.name} failed: {first_line(exc)}") from None
    _, needs = effective_target(target, options)
    return BuildResult(model=model, files=[lib], library=lib.name, runtime="tl2cgen", isa=needs)
