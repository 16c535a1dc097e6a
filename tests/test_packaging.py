"""Packaging contracts: the runtime install pulls no torch, and the runtime never imports it."""

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

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


def test_runtime_import_does_not_need_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # importing torch now raises ImportError
        "import mlx_safesig, mlx_safesig.cli, mlx_safesig.convert, mlx_safesig.bench\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-500:]
