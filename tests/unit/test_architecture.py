"""The code's shape: no import cycles, the compiler's layers in order, one table of CPU features."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from kiln import isa

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"kiln": ROOT / "functions" / "kiln", "kiln_compiler": ROOT / "compiler-container" / "kiln_compiler"}
SOURCE_DIRS = [ROOT / d for d in ("functions", "compiler-container", "infra", "bench", "scripts")]


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(pkg, root, p): p for pkg, root in PACKAGES.items() for p in root.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``name`` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*prefix, *(node.module.split(".") if node.module else [])])
            # ``from pkg import mod`` imports the module pkg.mod; ``from pkg import name`` imports pkg
            candidates = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for cand in candidates:
            # the deepest of our modules the import names (``from .x import y``: y may be a module or a name)
            while cand and cand not in known:
                cand = cand.rpartition(".")[0]
            if cand and cand != name:
                found.add(cand)
    return found


def test_relative_imports_name_existing_modules() -> None:
    # GIVEN every relative import (a lazy one inside a function fails only when that code path runs)
    modules = _modules()
    broken = []
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                module = ".".join([*base[: len(base) - node.level + 1], *(node.module or "").split(".")]).strip(".")
                if module not in modules:
                    broken.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    # WHEN resolved  THEN each names a module of the package
    assert broken == []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    # GIVEN every import in kiln and kiln_compiler, including the ones inside functions (which linters miss)
    graph = _graph()
    assert "kiln_compiler.tuning.search" in graph and graph["kiln_compiler.pipeline"]
    # WHEN the import graph is walked  THEN no module reaches itself
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph) or [])}"


def test_cycle_finder_finds_a_cycle() -> None:
    # GIVEN a graph with a hidden circle  WHEN searched  THEN the circle is reported
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


# The compiler's layers, lowest first: a module may import only from its own layer or the ones below.
LAYERS = [
    {"kiln_compiler.errors", "kiln_compiler.options", "kiln_compiler.archive", "kiln_compiler.samples",
     "kiln_compiler.aws", "kiln_compiler.mxnet_convert", "kiln_compiler.faults", "kiln_compiler.pickles"},
    {"kiln_compiler.loaders"},
    {"kiln_compiler.graph"},
    {"kiln_compiler.schedules"},
    {"kiln_compiler.tuning"},
    {"kiln_compiler.pipeline"},
    {"kiln_compiler.backends", "kiln_compiler.package", "kiln_compiler.profile", "kiln_compiler.accuracy",
     "kiln_compiler.quantize"},
    {"kiln_compiler.compile"},
    {"kiln_compiler.job"},
    {"kiln_compiler.__main__", "kiln_compiler"},
]


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer if top != "kiln_compiler"):
            return i
    return len(LAYERS) - 1 if module == "kiln_compiler" else None


def test_compiler_layers_import_downwards() -> None:
    # GIVEN the compiler's modules and their layers (catalog/isa -> schedules -> tuning -> pipeline -> backends
    # -> compile -> job)
    graph = _graph()
    compiler = {m for m in graph if m.startswith("kiln_compiler")}
    assert all(_layer(m) is not None for m in compiler), sorted(m for m in compiler if _layer(m) is None)
    # WHEN each import is compared with the importer's layer  THEN none reaches up
    upward = sorted(f"{m} -> {d}" for m in compiler for d in graph[m]
                    if d.startswith("kiln_compiler") and (_layer(d) or 0) > (_layer(m) or 0))
    assert upward == []


def _feature_names() -> set[str]:
    names: set[str] = set()
    for models in isa.CPU_MODELS.values():
        names.update(models)
        for features in models.values():
            names.update(features)
    return names - {"generic"}


def test_cpu_features_are_tabled_only_in_isa() -> None:
    # GIVEN the CPU model and feature names of kiln.isa
    names = _feature_names()
    assert {"avx512f", "haswell", "znver4", "neoverse-n1", "asimddp"} <= names
    offenders = []
    # WHEN every source file outside kiln/isa.py is searched for a collection literal naming two or more of them
    for directory in SOURCE_DIRS:
        for path in directory.rglob("*.py"):
            if path == PACKAGES["kiln"] / "isa.py" or "cdk.out" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Dict):
                    elements = [*node.keys, *node.values]
                elif isinstance(node, ast.Tuple | ast.List | ast.Set):
                    elements = list(node.elts)
                else:
                    continue
                hits = {e.value for e in elements if isinstance(e, ast.Constant) and e.value in names}
                if len(hits) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(hits)}")
    # THEN there is none: every table of CPU features is the one in kiln.isa
    assert offenders == []


@pytest.mark.parametrize(("mcpu", "wanted", "lanes"), [
    ("haswell", {"avx2", "fma"}, 8), ("znver4", {"avx512f", "avx512_vnni", "avx512_bf16"}, 16),
    ("tigerlake", {"avx512f", "avx512_vnni"}, 16), ("cooperlake", {"avx512f", "avx512_bf16"}, 16),
    ("icelake-client", {"avx512f"}, 16), ("sapphirerapids", {"amx_bf16", "amx_int8"}, 16),
])
def test_isa_table_covers_every_cpu_the_schedules_know(mcpu: str, wanted: set[str], lanes: int) -> None:
    # GIVEN an x86 mcpu  WHEN looked up  THEN its features and vector width come from the same entry
    cpu = isa.cpu_features("x86_64-linux-gnu", mcpu)
    assert wanted <= cpu.features and set(cpu.runtime_check) == cpu.features and cpu.vector_lanes == lanes


def test_isa_mattr_and_unknown_cpus() -> None:
    # GIVEN mattr additions/removals and an mcpu outside the table
    cpu = isa.cpu_features("x86_64-linux-gnu", "haswell", ["+avx512f", "+avx512vnni", "-fma"])
    # THEN they change the feature set (LLVM names mapped to cpuinfo names); unknown CPUs are refused
    assert {"avx512f", "avx512_vnni"} <= cpu.features and "fma" not in cpu.features and cpu.vector_lanes == 16
    with pytest.raises(isa.UnknownCpuError, match="ivybridge"):
        isa.cpu_features("x86_64-linux-gnu", "ivybridge")
    with pytest.raises(isa.UnknownCpuError, match="aarch64"):
        isa.cpu_features("aarch64-linux-gnu", "znver4")
    arm = isa.cpu_features("aarch64-linux-gnu", "neoverse-n1", ["+neon"])
    assert arm.vector_lanes == 4 and "asimddp" in arm.features and arm.runtime_check == ()


@pytest.mark.parametrize(("triple", "mcpu", "unit"), [
    ("x86_64-linux-gnu", "haswell", isa.VectorUnit(8, 16)),
    ("x86_64-linux-gnu", "skylake-avx512", isa.VectorUnit(16, 32)),
    ("i686-linux-gnu", "pentium4", isa.VectorUnit(4, 8)),
    ("aarch64-linux-gnu", "neoverse-n1", isa.VectorUnit(4, 32)),
    ("armv7l-linux-gnueabihf", "cortex-a72", isa.VectorUnit(4, 16)),
])
def test_isa_vector_unit_counts_registers_per_architecture(triple: str, mcpu: str, unit: isa.VectorUnit) -> None:
    # GIVEN a target triple and mcpu  WHEN its vector unit is looked up
    # THEN lanes and register count are the architecture's (what register tiles are sized by)
    assert isa.cpu_features(triple, mcpu).vector_unit == unit
