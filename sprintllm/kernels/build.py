"""Compile sprintllm's C kernels on first use and load them with ctypes.

The sources in csrc/ are plain C (no torch headers), so a build takes about a second.
The shared library lands in a per-user cache directory ($SPRINTLLM_CACHE_DIR, else
$XDG_CACHE_HOME/sprintllm, else ~/.cache/sprintllm), named by a hash of everything that
changes the binary: the sources, the compiler command and version, and -- because of
-march=native -- the CPU's feature flags. A file lock keeps concurrent processes from
building the same library at once; the library is written under a temporary name and
renamed into place, so a reader never sees a half-written file.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
# -ffp-contract=off keeps dequantization bit-exact (ggml multiplies, then adds); the dot
# kernels ask for their fused multiply-adds explicitly.
BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off")
# The portable build: same code with the SIMD paths compiled out (tests use it).
PORTABLE_FLAGS = ("-mno-avx512f",)


class KernelBuildError(RuntimeError):
    """No C compiler, or the kernels failed to compile or load."""


def cache_dir() -> Path:
    if os.environ.get("SPRINTLLM_CACHE_DIR"):
        return Path(os.environ["SPRINTLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sprintllm"


def compiler() -> list[str]:
    """The C compiler command: $CC, else cc, else gcc."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc"):
        if shutil.which(name):
            return [name]
    raise KernelBuildError("no C compiler found (set CC, or install cc/gcc)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build_key(cc: list[str], flags: tuple[str, ...], sources: list[Path]) -> str:
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"C compiler {shlex.join(cc)} does not run: {exc}") from exc
    h = hashlib.sha256()
    for part in (shlex.join(cc), version, " ".join(flags), _cpu_flags()):
        h.update(part.encode() + b"\0")
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_library(portable: bool = False) -> Path:
    """Path of the compiled library, compiling it first if the cache has none."""
    cc = compiler()
    flags = BASE_FLAGS + (PORTABLE_FLAGS if portable else ())
    sources = sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("*.h"))
    key = _build_key(cc, flags, sources)
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"kernels-{'portable-' if portable else ''}{key}.so"
    if lib.exists():
        return lib
    with open(out_dir / f"{lib.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():  # another process built it while we waited
            return lib
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=lib.name, suffix=".tmp")
        os.close(fd)
        cmd = [*cc, *flags, "-o", tmp, *(str(s) for s in sources if s.suffix == ".c")]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line] or ["(no message)"]
                raise KernelBuildError(f"{cc[0]} failed on sprintllm/kernels/csrc: {errors[0].strip()}\n"
                                       f"{shlex.join(cmd)}\n{result.stderr.strip()}")
            os.replace(tmp, lib)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"{shlex.join(cmd)} failed: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def load_library(portable: bool = False) -> ctypes.CDLL:
    """Build if needed and load the kernels. torch must already be imported, so that the
    library's libgomp.so.1 binds to the copy torch loaded (one OpenMP thread pool)."""
    import torch  # noqa: F401  (see docstring)

    path = build_library(portable)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelBuildError(f"cannot load {path}: {exc}") from exc
