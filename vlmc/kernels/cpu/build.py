"""Compile the C kernels (every ``*.c`` here, with ``vlmc.h``) once per machine into the
vlmc cache and load them with ctypes.

The shared library lives at ``$VLMC_CACHE/kernels/`` (default ``~/.cache/vlmc/kernels/``)
under a name hashed from the C sources and header, the compiler command and the machine
(CPU model and flags), so an edited kernel, another compiler or another CPU never loads a stale
build. It is written to a temporary file and renamed into place, so concurrent first
uses (several processes, pytest-xdist) never see a half-written library.

``load()`` returns None when the kernels are disabled (``VLMC_CPU_KERNELS=0``), when no
C compiler is found, or when compiling or loading fails; the caller then uses the MLX
reference ops. The reason is printed to stderr once per process.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .bindings import ABI_VERSION, declare

SOURCE_DIR = Path(__file__).parent

NATIVE_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
PORTABLE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread"]
# The AVX2 code path with AVX2's 16 vector registers, on a machine that also has
# AVX-512 (what most x86 users run; the tests build it to cover those configurations).
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-mno-avx512f", "-shared", "-fPIC", "-pthread"]

_loaded: dict[tuple, ctypes.CDLL | None] = {}
_warned = False
COMPILE_TIMEOUT_S = 900


def enabled() -> bool:
    return os.environ.get("VLMC_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("VLMC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vlmc"
    return base / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine_id() -> str:
    """CPU identity for the cache key: -march=native code must not move to another CPU."""
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def sources() -> list[Path]:
    """The library's translation units: one .c file per concern, each including vlmc.h."""
    return sorted(SOURCE_DIR.glob("*.c"))


def _defines() -> list[str]:
    """The ABI number the bindings describe, compiled in (vlmc.h refuses to build without it)
    and checked again at load."""
    return [f"-DVLMC_ABI={ABI_VERSION}"]


def library_path(cc: str, flags: list[str]) -> Path:
    h = hashlib.sha256()
    for src in sorted([*SOURCE_DIR.glob("*.c"), *SOURCE_DIR.glob("*.h")]):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update("\0".join([cc, *flags, *_defines()]).encode())
    h.update(_machine_id().encode())
    return cache_dir() / f"vlmc_cpu_{h.hexdigest()[:20]}.so"


def _compile(cc: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, *_defines(), "-o", tmp, *map(str, sources()), "-lm"]
        # ~30 s on 2 idle cores; a loaded machine takes several times that
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic on POSIX
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    """Load a built library, check its ABI number and declare its functions."""
    lib = ctypes.CDLL(str(path))
    lib.vlmc_abi_version.restype = ctypes.c_int
    lib.vlmc_abi_version.argtypes = []
    if lib.vlmc_abi_version() != ABI_VERSION:
        raise RuntimeError(f"kernel ABI {lib.vlmc_abi_version()} != expected {ABI_VERSION}")
    return declare(lib)


def build(native: bool = True, *, flags: list[str] | None = None,
          force: bool = False) -> tuple[ctypes.CDLL, Path, bool]:
    """Compile (unless cached) and load. Returns (library, path, compiled_now).

    ``native=True`` tries ``-march=native`` first and falls back to the portable flags;
    ``native=False`` builds only the portable (scalar, no AVX2) variant; ``flags`` builds
    exactly that. Raises on failure.
    """
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    errors = []
    candidates = [flags] if flags else [NATIVE_FLAGS, PORTABLE_FLAGS] if native else [PORTABLE_FLAGS]
    for flags in candidates:
        path = library_path(cc, flags)
        compiled = False
        try:
            if force or not path.exists():
                print(f"vlmc: compiling the CPU kernels into {path.parent}: once per machine and vlmc version, "
                      f"about a minute on 2 cores", file=sys.stderr)
                _compile(cc, flags, path)
                compiled = True
            return _load(path), path, compiled
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
            if flags is NATIVE_FLAGS and len(candidates) > 1:  # say so: the portable build is much slower
                print(f"vlmc: the CPU kernels for this machine's instruction set did not build ({str(e)[:300]}); "
                      "trying the portable build, which is much slower (it retries the native one next time)",
                      file=sys.stderr)
    raise RuntimeError("; ".join(errors))


def load(native: bool = True) -> ctypes.CDLL | None:
    """The kernel library, or None (kernels disabled or unavailable: use the MLX ops)."""
    global _warned
    if not enabled():
        return None
    key = (native,)
    if key not in _loaded:
        try:
            _loaded[key] = build(native)[0]
        except Exception as e:  # noqa: BLE001 - any failure means: fall back, say why once
            _loaded[key] = None
            if not _warned:
                _warned = True
                print(f"vlmc: CPU kernels unavailable, using the slower MLX ops ({e})", file=sys.stderr)
    return _loaded[key]
