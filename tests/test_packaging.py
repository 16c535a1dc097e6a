"""Packaging contracts: the runtime install pulls no torch, and the runtime never imports it."""

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement


def runtime_closure(name: str) -> set:
    """Every distribution `pip install name` (no extras) would install, from installed metadata."""
    env = {**default_environment(), "extra": ""}
    seen, todo = set(), [name]
    while todo:
        dist = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = distribution(dist).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
                if req.extras:  # e.g. mlx[cpu]: follow the extra's requirements too
                    for extra_line in distribution(req.name).requires or []:
                        extra_req = Requirement(extra_line)
                        if extra_req.marker and any(
                            extra_req.marker.evaluate({**env, "extra": e}) for e in req.extras
                        ) and not extra_req.marker.evaluate(env):
                            todo.append(extra_req.name)
    return seen


def test_plain_install_pulls_no_torch():
    closure = runtime_closure("mlx-safesig")
    assert {"mlx", "mlx-lm", "numpy", "huggingface-hub", "click"} <= closure
    assert "torch" not in closure


def test_gguf_is_a_runtime_dependency():
    """convert reads k-quant GGUF files (the common ones) with it: no extra install needed."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "gguf" in {Requirement(d).name for d in deps}


def test_runtime_import_does_not_need_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # importing torch now raises ImportError
        "import mlx_safesig, mlx_safesig.cli, mlx_safesig.convert, mlx_safesig.bench\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-500:]


ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"mlx_safesig": ROOT / "mlx_safesig", "mlx_safesig.convert": ROOT / "convert"}


def modules() -> dict:
    """Dotted module name -> (file, is a package's __init__), for the runtime and the converter."""
    found = {}
    for package, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (f, f.name == "__init__.py")
    return found


def import_graph() -> dict:
    """Module -> the project modules it imports, at the top or inside functions."""
    found, graph = modules(), {}
    for name, (f, is_package) in found.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in found else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in found and d != name}
    return graph


def test_every_package_is_listed_for_setuptools():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert {name for name, (_, is_package) in modules().items() if is_package} == listed


def test_only_the_cli_imports_click():
    importers = {name for name, (f, _) in modules().items()
                 if re.search(r"^\s*(import click|from click)", f.read_text(), re.M)}
    assert importers and all(name.split(".")[:2] == ["mlx_safesig", "cli"] for name in importers)


def test_no_module_is_longer_than_600_lines():
    long = {name: n for name, (f, _) in modules().items()
            if (n := len(f.read_text().splitlines())) > 600}
    assert long == {}


def test_the_project_imports_have_no_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
