"""Load an optimized OpenBLAS before mlx is imported (Linux only).

Why: the Linux ``mlx[cpu]`` wheel links a slow reference BLAS (``mlx_cpu.libs/libblas-*.so.3``).
If an OpenBLAS is already in the *global* symbol scope when ``mlx.core`` is imported, the dynamic
linker binds libmlx's ``cblas_sgemm`` & co. to it instead: fp32 gemv ~3-6x, gemm ~70x faster.

Measured finding (glibc 2.36, CPython 3.11): a *late* load, after ``import mlx.core``, has no
effect even if no BLAS call happened yet. CPython dlopens extension modules with RTLD_NOW
(``sys.getdlopenflags() == 2``), so libmlx's BLAS PLT slots are bound at import time
(``LD_DEBUG=bindings``). We still load it then (harmless) but stay quiet.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
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


def _materialize(elf: bytes, name: str) -> str:
    """Write ``elf`` to the per-user cache (atomic vs. concurrent processes) or else a memfd."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    dst = os.path.join(base, "mlx-safesig", "blas", f"{len(elf)}-{name}")
    try:
        if not (os.path.isfile(dst) and os.path.getsize(dst) == len(elf)):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(elf)
                os.replace(tmp, dst)  # racing writers produce identical bytes; last one wins
            except BaseException:
                os.unlink(tmp)
                raise
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


def preload_openblas() -> str | None:
    """Load OpenBLAS RTLD_GLOBAL; return its path or None. Never raises; memoized per process.

    Must run before ``import mlx.core`` to have any effect (see the module docstring); if mlx is
    already imported it still loads (and returns the path) but prints no notice.
    A forced path that cannot be loaded does not fall back: None plus the one-line notice.
    """
    if "path" in _state:
        return _state["path"]
    _state["path"] = None
    env = os.environ.get(_ENV, "").strip()
    if not sys.platform.startswith("linux") or env.lower() == "off":
        return None
    try:
        for path in [env] if env else _candidates():
            if path and (os.path.exists(path) or "/" not in path) and _load(path):
                _state["path"] = path
                return path
    except Exception:
        pass
    if "mlx.core" not in sys.modules:
        hint = f"{_ENV}={env} could not be loaded; " if env else ""
        print(
            f"mlx-safesig: {hint}no OpenBLAS found, mlx falls back to its slow reference BLAS "
            "(decode/training slower); fix: pip install cmeel-openblas (or apt-get install "
            f"libopenblas0-pthread), or set {_ENV}=off to silence.",
            file=sys.stderr,
        )
    return None
