"""Load an optimized OpenBLAS before mlx is imported (Linux only).

Why: the Linux ``mlx[cpu]`` wheel links a slow reference BLAS (``mlx_cpu.libs/libblas-*.so.3``).
If an OpenBLAS is already in the *global* symbol scope when ``mlx.core`` is imported, the dynamic
linker binds libmlx's ``cblas_sgemm`` & co. to it instead: fp32 gemv ~3-6x, gemm ~70x faster.

Measured finding (glibc 2.36, CPython 3.11): a *late* load, after ``import mlx.core``, has no
effect even if no BLAS call happened yet. CPython dlopens extension modules with RTLD_NOW
(``sys.getdlopenflags() == 2``), so libmlx's BLAS PLT slots are bound at import time
(``LD_DEBUG=bindings``). So when mlx is already imported we load nothing and say so in one line:
import ``mlx_safesig`` before ``mlx`` (the test suite's conftest did not, and ran every test on the
reference BLAS).

A library is used only once a child process has run a few sgemm/sgemv calls through it
(``_works``): some builds are compiled for one CPU family without dispatch (cmeel-openblas 0.3.31
and 0.3.23 run AVX-512 code in ``sgemm_small_kernel`` and die of SIGILL on an AVX2-only AMD EPYC;
0.3.29 and Debian's DYNAMIC_ARCH build work there), and a crash in libmlx cannot be caught. The
verdict is cached per library file and CPU, so only the first import on a machine pays for it.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import struct
import subprocess
import sys
import sysconfig
import tempfile

_ENV = "MLX_SAFESIG_BLAS"  # "off" disables; a path forces that library (no fallback)
_CMEEL = os.path.join("cmeel.prefix", "lib", "libopenblas.so.0")
_DEBIAN = [
    f"/usr/lib/{a}-linux-gnu/openblas-pthread/libopenblas.so.0" for a in ("x86_64", "aarch64")
]
_state: dict = {}  # per-process memo (so the notice is printed at most once)


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([*sys.path, paths["platlib"], paths["purelib"]]))


def _candidates():
    yield from (os.path.join(d, _CMEEL) for d in _site_dirs())
    try:
        from importlib.metadata import distribution

        yield str(distribution("cmeel-openblas").locate_file(_CMEEL))
    except Exception:
        pass
    yield from _DEBIAN
    import ctypes.util

    yield ctypes.util.find_library("openblas")  # spawns ldconfig, so last


def _set_soname(elf: bytearray, name: bytes) -> bool:
    """Point DT_SONAME of a little-endian ELF64 image at ``name`` (reused or patched in place)."""
    if elf[:6] != b"\x7fELF\x02\x01":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads, dyn = [], None
    for i in range(phnum):
        typ, _, off, vaddr, _, size = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if typ == 1:
            loads.append((vaddr, off, size))
        elif typ == 2:
            dyn = (off, size)
    ents = [(j, *struct.unpack_from("<qQ", elf, j)) for j in range(dyn[0], sum(dyn), 16)]
    tags = {tag: (pos, val) for pos, tag, val in ents}
    strtab = next(o + tags[5][1] - v for v, o, s in loads if v <= tags[5][1] < v + s)
    soname_pos, old = tags[14]
    new = elf.find(b"\0" + name + b"\0", strtab, strtab + tags[10][1]) + 1 - strtab
    if new <= 0:  # not present (auditwheel keeps it as the version-definition base name)
        old_len = elf.index(b"\0", strtab + old) - strtab - old
        if len(name) > old_len:
            return False
        elf[strtab + old : strtab + old + len(name) + 1] = name + b"\0"
        new = old
    struct.pack_into("<Q", elf, soname_pos + 8, new)
    return True


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "mlx-safesig", "blas")


def _write_atomic(dst: str, data: bytes):
    """Write ``data`` to ``dst`` atomically (racing writers write identical bytes)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def _materialize(elf: bytes, name: str) -> str:
    """Write ``elf`` to the per-user cache (atomic vs. concurrent processes) or else a memfd."""
    dst = os.path.join(_cache_dir(), f"{len(elf)}-{name}")
    try:
        if not (os.path.isfile(dst) and os.path.getsize(dst) == len(elf)):
            _write_atomic(dst, elf)
        return dst
    except OSError:  # read-only home etc.; the fd stays open for the life of the process
        fd = os.memfd_create(name)
        with open(fd, "wb", closefd=False) as f:
            f.write(elf)
        return f"/proc/self/fd/{fd}"


def _gfortran_shim() -> bool:
    """Satisfy ``NEEDED libgfortran.so.5`` on machines without the system libgfortran5.

    cmeel's libopenblas.so.0 has no RPATH/RUNPATH, so no file placed next to it (or a symlink
    to it) is ever searched, and LD_LIBRARY_PATH is only read at process start. But glibc first
    matches a NEEDED name against the SONAME of already-loaded objects. So we load a copy of a
    wheel-vendored libgfortran (hashed soname) with DT_SONAME rewritten to libgfortran.so.5,
    after its vendored libquadmath (also matched by soname, so the copy's $ORIGIN RPATH, which
    glibc takes from the path as opened, not the symlink target, does not matter).
    """
    pattern = os.path.join("*.libs", "libgfortran-*.so.5*")
    srcs = [f for d in _site_dirs() for f in sorted(glob.glob(os.path.join(d, pattern)))]
    for src in sorted(srcs, key=lambda f: "mlx_cpu.libs" not in f):  # prefer mlx's own copy
        try:
            with open(src, "rb") as f:
                elf = bytearray(f.read())
            if not _set_soname(elf, b"libgfortran.so.5"):
                continue
            for qm in glob.glob(os.path.join(os.path.dirname(src), "libquadmath-*.so*")):
                ctypes.CDLL(qm)
            ctypes.CDLL(_materialize(elf, os.path.basename(src)))
            return True
        except Exception:
            continue
    return False


def _load(path: str) -> bool:
    """dlopen ``path`` RTLD_GLOBAL (with the gfortran shim if needed); check it is in effect."""
    try:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            if _state.setdefault("shim", None) is None:
                _state["shim"] = _gfortran_shim()
            if not _state["shim"]:
                return False
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        # Cheap check: exports CBLAS and is what a global lookup (as libmlx does) finds first.
        addr = ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value
        return addr == ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except Exception:
        return False


# Run in a child by ``_works``: load the library as preload would, then a few products through it
# (the small-matrix kernels, the blocked ones and gemv, which decode uses), checked.
_PROBE = r"""
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("_blas_probe", sys.argv[1])
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
if not b._load(sys.argv[2]):
    sys.exit(3)
lib = ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)
one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
for n in (4, 64, 300):
    a, c = (ctypes.c_float * (n * n))(*([1.0] * (n * n))), (ctypes.c_float * (n * n))()
    lib.cblas_sgemm(101, 111, 111, n, n, n, one, a, n, a, n, zero, c, n)
    y = (ctypes.c_float * n)()
    lib.cblas_sgemv(101, 111, n, n, one, a, n, a, 1, zero, y, 1)
    if (c[0], c[n * n - 1], y[0], y[n - 1]) != (n, n, n, n):
        sys.exit(4)
print("ok")
"""
_PROBE_VERSION = 1


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what decides which instructions run)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return ""


def _works(path: str) -> tuple[bool, str]:
    """Whether ``path`` loads and computes correctly in a child process on this CPU: (ok, why
    not). Cached per library file, CPU and probe version under ``~/.cache/mlx-safesig/blas``."""
    try:
        st = os.stat(path)
        ident = f"{_PROBE_VERSION}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|"
    except OSError:
        ident = f"{_PROBE_VERSION}|{path}|"  # a bare soname: probed every time
    key = hashlib.sha1((ident + _cpu_signature()).encode()).hexdigest()[:16]
    memo = os.path.join(_cache_dir(), f"probe-{key}")
    try:
        with open(memo) as f:
            ok, why = f.read().split("\n", 1)
            return ok == "ok", why
    except (OSError, ValueError):
        pass
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, os.path.abspath(__file__), path],
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and r.stdout.strip() == "ok":
            ok, why = True, ""
        elif r.returncode < 0:
            ok, why = False, f"it crashed on this CPU (signal {-r.returncode})"
        else:
            ok, why = False, f"a test product through it failed (exit {r.returncode})"
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"it could not be tested ({e})"
    try:
        _write_atomic(memo, f"{'ok' if ok else 'bad'}\n{why}".encode())
    except OSError:
        pass
    return ok, why


def preload_openblas() -> str | None:
    """Load OpenBLAS RTLD_GLOBAL; return its path or None. Never raises; memoized per process.

    Must run before ``import mlx.core`` to have any effect (see the module docstring); if mlx is
    already imported it loads nothing: None plus a one-line notice saying to import mlx_safesig
    first. A forced path that cannot be loaded does not fall back: None plus the one-line notice.
    """
    if "path" in _state:
        return _state["path"]
    _state["path"] = None
    env = os.environ.get(_ENV, "").strip()
    if not sys.platform.startswith("linux") or env.lower() == "off":
        return None
    if "mlx.core" in sys.modules:
        print(
            "mlx-safesig: mlx was imported before mlx_safesig, so OpenBLAS cannot be preloaded for "
            "it in this process (the mlx[cpu] wheel's own BLAS is slow); import mlx_safesig before "
            f"mlx, or set {_ENV}=off to silence.",
            file=sys.stderr,
        )
        return None
    rejected = []
    try:
        for path in [env] if env else _candidates():
            if not path or not (os.path.exists(path) or "/" not in path):
                continue
            ok, why = _works(path)
            if not ok:
                rejected.append(f"{_ENV}={env} is not used: {why}; " if env
                                else f"skipped {path}: {why}; ")
            elif _load(path):
                _state["path"] = path
                return path
    except Exception:
        pass
    hint = "".join(rejected) or (f"{_ENV}={env} could not be loaded; " if env else "")
    print(
        f"mlx-safesig: {hint}no working OpenBLAS found, mlx falls back to its slow reference "
        "BLAS (decode/training slower); fix: apt-get install libopenblas0-pthread (or pip "
        f"install cmeel-openblas), or set {_ENV}=off to silence.",
        file=sys.stderr,
    )
    return None
