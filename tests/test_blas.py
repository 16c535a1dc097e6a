"""Tests for mlx_safesig._blas.preload_openblas.

Every test runs in a fresh subprocess: dlopen(RTLD_GLOBAL) and the once-per-process notice are
process state that cannot be undone. ``_blas`` is loaded by file path so these tests do not
depend on (or import mlx through) the rest of the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BLAS_PY = Path(__file__).resolve().parents[1] / "mlx_safesig" / "_blas.py"
SYS_GFORTRAN = "/usr/lib/x86_64-linux-gnu/libgfortran.so.5.0.0"
PRELUDE = f"""
import importlib.util, os, sys
_spec = importlib.util.spec_from_file_location("_blas", {str(BLAS_PY)!r})
b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(b)
def mapped(name):
    return any(name in line for line in open("/proc/self/maps"))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def run(code: str, argv_prefix: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLX_SAFESIG_BLAS"}
    full_env.update(env)
    cmd = [*argv_prefix, sys.executable, "-c", PRELUDE + code]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


@linux_only
def test_default_loads_openblas_and_maps_it():
    r = run("p = b.preload_openblas(); print(p); print(mapped('libopenblas'))")
    path, is_mapped = r.stdout.split()
    assert path != "None" and Path(path).exists(), r.stderr
    assert is_mapped == "True"
    assert r.stderr == ""


@linux_only
def test_matmul_matches_numpy_after_preload():
    r = run(
        """
assert b.preload_openblas()
import numpy as np, mlx.core as mx
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 576), dtype=np.float32)
w = rng.standard_normal((576, 2304), dtype=np.float32)
got = np.array(mx.array(a) @ mx.array(w))
ref = a.astype(np.float64) @ w.astype(np.float64)
print(np.abs(got - ref).max() / np.abs(ref).max())
"""
    )
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 1e-3


@linux_only
def test_mlx_binds_cblas_to_preloaded_openblas():
    """The point of the preload: libmlx's cblas_sgemm resolves to OpenBLAS, not libblas-*."""
    r = run("assert b.preload_openblas(); import mlx.core", LD_DEBUG="bindings")
    lines = [ln for ln in r.stderr.splitlines() if "libmlx.so" in ln and "`cblas_sgemm'" in ln]
    assert lines and all("libopenblas" in ln for ln in lines), lines


@linux_only
def test_off_loads_nothing_and_prints_nothing():
    r = run("print(b.preload_openblas(), mapped('libopenblas'))", MLX_SAFESIG_BLAS="off")
    assert r.stdout.split() == ["None", "False"]
    assert r.stderr == ""


@linux_only
def test_bogus_forced_path_does_not_fall_back_and_notices_once():
    """Decision: a forced path is final; if it cannot be loaded we say so instead of guessing."""
    r = run(
        "print(b.preload_openblas(), mapped('libopenblas'))", MLX_SAFESIG_BLAS="/nonexistent.so"
    )
    assert r.stdout.split() == ["None", "False"]
    assert len(r.stderr.splitlines()) == 1
    assert "/nonexistent.so" in r.stderr and "pip install cmeel-openblas" in r.stderr


@linux_only
def test_notice_printed_at_most_once():
    r = run(
        "b._candidates = lambda: iter(['/nonexistent/libopenblas.so.0'])\n"
        "print([b.preload_openblas() for _ in range(3)])"
    )
    assert r.stdout.strip() == "[None, None, None]"
    assert len(r.stderr.splitlines()) == 1
    assert "apt-get install libopenblas0-pthread" in r.stderr


@linux_only
def test_too_late_after_mlx_says_so_once_and_loads_nothing():
    """mlx binds its BLAS calls when imported: a later preload cannot help, so say how to fix it."""
    code = "import mlx.core\nprint([b.preload_openblas() for _ in range(2)], mapped('libopenblas.so'))"
    r = run(code)
    assert r.stdout.split() == ["[None,", "None]", "False"]
    assert len(r.stderr.splitlines()) == 1
    assert "import mlx_safesig before mlx" in r.stderr
    r = run(code, MLX_SAFESIG_BLAS="off")
    assert r.stdout.split() == ["[None,", "None]", "False"] and r.stderr == ""


def test_non_linux_is_a_no_op():
    r = run("sys.platform = 'darwin'\nprint(b.preload_openblas())")
    assert r.stdout.strip() == "None"
    assert r.stderr == ""


@linux_only
def test_cmeel_openblas_loads_without_system_libgfortran(tmp_path):
    """Fresh machine: no system libgfortran5, so the patched vendored copy must satisfy it.

    If the system library exists, hide it in a private mount namespace (needs root + unshare),
    together with Debian's OpenBLAS so the cmeel wheel is the only candidate.
    """
    prefix: tuple[str, ...] = ()
    if os.path.exists(SYS_GFORTRAN):
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("system libgfortran present and cannot be hidden")
        hide = (
            f"mount --bind /dev/null {SYS_GFORTRAN} && "
            "mount -t tmpfs none /usr/lib/x86_64-linux-gnu/openblas-pthread && "
            'exec "$@"'
        )
        prefix = ("unshare", "-m", "sh", "-c", hide, "sh")
    code = (
        "p = next(c for c in b._candidates() if c and 'cmeel.prefix' in c and os.path.exists(c))\n"
        "print(b._load(p), mapped(%r))\n"
        "ok, why = b._works(p)\n"
        "print(ok, b.preload_openblas() == (p if ok else None))"
    )
    r = run(code % "mlx-safesig/blas/", prefix, XDG_CACHE_HOME=str(tmp_path))
    # the patched vendored libgfortran satisfies cmeel's OpenBLAS (whether or not this CPU can
    # run that build: 0.3.31 dies of SIGILL without AVX-512, and preload then skips it)
    loaded, shim_mapped, _, consistent = r.stdout.split()
    assert (loaded, shim_mapped, consistent) == ("True", "True", "True"), r.stdout + r.stderr
    cached = [p.name for p in (tmp_path / "mlx-safesig" / "blas").iterdir()]
    assert not any(n.startswith(".tmp-") for n in cached)
    assert any(n.startswith("probe-") for n in cached), cached


CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


@linux_only
def test_a_library_that_crashes_on_this_cpu_is_skipped_and_named(tmp_path):
    """A build for another CPU dies of SIGILL in its kernels: preload tests each candidate in a
    child process first (here the child is made to crash) and uses none that fails."""
    r = run(
        f"b._PROBE = {CRASH!r}\n"
        "first = next(c for c in b._candidates() if c and os.path.exists(c))\n"
        "b._candidates = lambda: iter([first])\n"
        "print(b.preload_openblas(), mapped('libopenblas'))",
        XDG_CACHE_HOME=str(tmp_path),
    )
    assert r.stdout.split() == ["None", "False"], r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert "skipped " in r.stderr and "it crashed on this CPU (signal 4)" in r.stderr


@linux_only
def test_probe_verdict_is_cached_per_library_and_cpu(tmp_path):
    """The first import on a machine pays for the probe; later ones read its verdict, until the
    CPU (or the library file) changes."""
    pick = "b._candidates = lambda: iter([b._DEBIAN[0]] if os.path.exists(b._DEBIAN[0]) else [])\n"
    first = run(pick + "print(b.preload_openblas())", XDG_CACHE_HOME=str(tmp_path))
    if first.stdout.strip() == "None":  # no Debian OpenBLAS: use the cmeel build if it runs here
        pick = ("c = next(c for c in b._candidates() if c and 'cmeel.prefix' in c)\n"
                "b._candidates = lambda: iter([c])\n")
        first = run(pick + "print(b.preload_openblas())",
                    XDG_CACHE_HOME=str(tmp_path))
    assert first.stdout.strip() != "None", first.stderr
    again = run(f"b._PROBE = {CRASH!r}\n" + pick + "print(b.preload_openblas())",
                XDG_CACHE_HOME=str(tmp_path))
    assert again.stdout.strip() == first.stdout.strip(), again.stderr
    other_cpu = run(f"b._PROBE = {CRASH!r}\nb._cpu_signature = lambda: 'other'\n"
                    + pick + "print(b.preload_openblas())", XDG_CACHE_HOME=str(tmp_path))
    assert other_cpu.stdout.strip() == "None"
    assert "crashed on this CPU" in other_cpu.stderr
