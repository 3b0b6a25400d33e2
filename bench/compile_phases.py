"""Where an untuned compile's time goes: CPU seconds per phase of ``compile_relax`` + ``export_library``.

    python bench/compile_phases.py densenet121 ml_c5 [--out phases.json]

Runs the model as ``bench/kernels.py build`` does (light ONNX model, catalog target, default schedules)
and reports the process CPU time (user + sys, this process and its children: the linker) and wall time
of each phase, plus how many LLVM builds Relax's FoldConstant made in it. The phases are timed by wrapping
the pipeline's functions in this process (measurement only; nothing is changed). CPU time is what to
compare on a loaded host; compare builds of two revisions interleaved, with the same command (ADR 0040).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Phases:
    """CPU and wall seconds and FoldConstant builds, per named phase (nested phases are subtracted)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.stack: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        row = self.rows.setdefault(name, {"cpu_s": 0.0, "wall_s": 0.0, "fold_builds": 0})
        cpu, wall = _cpu(), time.time()
        try:
            yield
        finally:
            self.stack.pop()
            spent_cpu, spent_wall = _cpu() - cpu, time.time() - wall
            row["cpu_s"] += spent_cpu
            row["wall_s"] += spent_wall
            if self.stack:  # the enclosing phase keeps only its own time
                outer = self.rows[self.stack[-1]]
                outer["cpu_s"] -= spent_cpu
                outer["wall_s"] -= spent_wall

    def wrap(self, owner: Any, attr: str, name: str, unless_inside: str | None = None) -> None:
        original: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if unless_inside in self.stack:
                return original(*args, **kwargs)
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    def count_fold_build(self) -> None:
        if self.stack:
            self.rows[self.stack[-1]]["fold_builds"] += 1


def _instrument(phases: Phases) -> None:
    import tvm
    import tvm.relax.vm_build
    from kiln_compiler import pipeline

    build_module = importlib.import_module("tvm.tirx.build")
    original_build = build_module.build

    def build(mod: Any, target: Any = None, pipeline: Any = "default") -> Any:
        if isinstance(mod, tvm.tirx.PrimFunc):  # FoldConstant builds one PrimFunc at a time
            phases.count_fold_build()
            with phases.phase("fold: LLVM builds"):
                return original_build(mod, target, pipeline)
        return original_build(mod, target, pipeline)

    tvm.register_global_func("tirx.build", build, override=True)
    build_module.build = build
    tvm.tirx.build = build
    phases.wrap(pipeline, "_cpu_kernels", "graph rewrites + fusion")
    for cls in ("VNNIConvSchedule", "SdotConvSchedule", "BF16ConvSchedule", "DefaultCPUSchedule"):
        _wrap_pass_class(phases, pipeline, cls, "default schedules")
    phases.wrap(pipeline, "_rewrite_layouts", "weight re-pack (RewriteLayout)")
    phases.wrap(build_module, "tir_to_runtime", "LLVM IR + optimisation", unless_inside="fold: LLVM builds")
    phases.wrap(tvm.relax.vm_build, "_vmlink", "TIR lowering")


def _wrap_pass_class(phases: Phases, module: Any, name: str, phase: str) -> None:
    cls = getattr(module, name)

    class Timed:
        def __init__(self, *args: Any) -> None:
            self._pass = cls(*args)

        def __call__(self, mod: Any) -> Any:
            with phases.phase(phase):
                return self._pass(mod)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._pass, attr)

    setattr(module, name, Timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("target")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--so", type=Path, help="keep the library here (default: a temporary file)")
    args = parser.parse_args()
    import tempfile

    from kernels import _model, _tvm_target
    from kiln_compiler.pipeline import compile_relax
    from tvm.relax.frontend.onnx import from_onnx

    phases = Phases()
    _instrument(phases)
    cpu0, wall0 = _cpu(), time.time()
    with phases.phase("load (onnx -> Relax)"):
        model, shapes = _model(args.model)
        mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    with phases.phase("other compile_relax"):
        compiled = compile_relax(mod, _tvm_target(args.target, None))
    with tempfile.TemporaryDirectory() as tmp, phases.phase("export_library (object code + link)"):
        compiled.executable.export_library(str(args.so or Path(tmp) / "model.so"))
    total = {"cpu_s": _cpu() - cpu0, "wall_s": time.time() - wall0}
    report = {"model": args.model, "target": args.target, "load_average": os.getloadavg(),
              "phases": {k: {m: round(v, 2) for m, v in row.items()} for k, row in phases.rows.items()},
              "total": {k: round(v, 2) for k, v in total.items()}, "unscheduled": list(compiled.unscheduled)}
    print(f"{args.model} {args.target} (load average {report['load_average'][0]:.1f})")
    for name, row in report["phases"].items():
        print(f"  {name:40s} cpu {row['cpu_s']:7.2f} s  wall {row['wall_s']:7.2f} s  fold builds {row['fold_builds']:.0f}")
    print(f"  {'total':40s} cpu {total['cpu_s']:7.2f} s  wall {total['wall_s']:7.2f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
