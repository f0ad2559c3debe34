"""Build the CPU kernel library once, ahead of serving, never hanging.

The library (csrc/) is compiled once per source version, torch installation and compiler
into ~/.cache/tokenmill/kernels/<key>/ (or $XDG_CACHE_HOME). It holds every instruction
set's kernels, so one build serves any x86-64 CPU; bindings.cpp picks the path at load.

- The compiler runs in a child process with a timeout; on timeout its whole process
  group is killed and the build fails with a message.
- Builds are serialised by an flock on `build.lock`: the kernel drops it when the holder
  dies, so a killed build can never leave a lock behind. The file keeps the builder's pid;
  finding it from a dead process (and its half-built folder) is reported and cleaned up.
- The finished library is moved into place with one rename, so a reader never loads a
  half-written file.

`python -m tokenmill.model.kernels.build OUT_DIR` is the child: it compiles into OUT_DIR.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("tokenmill.model.kernels")

LIBRARY_NAME = "tokenmill_cpu_kernels"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("bindings.cpp", "weight_ops.cpp", "decode_layers.cpp", "token_mask.cpp", "kernels_isa.cpp")
# -ffp-contract=off: the sampler's float32 operations must stay exactly those of its
# PyTorch twin (same tokens for the same seed); explicit fused multiply-adds still are.
# -fno-trapping-math / -fno-math-errno change no result; they let loops with selects and
# square roots vectorise.
_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
TIMEOUT_ENV = "TOKENMILL_CPU_KERNELS_BUILD_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0
_PROGRESS_EVERY_S = 15.0


class KernelBuildError(RuntimeError):
    """The kernel library could not be built; the message says why and where the log is."""


def compiler() -> str:
    return os.environ.get("CXX", "").strip() or "c++"


def _build_key() -> str:
    """What a build depends on: the sources, the torch installation (its headers and ABI
    are compiled in) and the compiler command."""
    import torch

    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{torch.__version__}\n{Path(torch.__file__).parent}\n{compiler()}\n{_CFLAGS}".encode())
    return digest.hexdigest()


def build_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill" / "kernels"
    return root / _build_key()


def library_path() -> Path:
    return build_dir() / f"{LIBRARY_NAME}.so"


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(text) if text else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise KernelBuildError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds.") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


class _BuildLock:
    """Exclusive lock on `<dir>/build.lock`, waited for at most `timeout_s`."""

    def __init__(self, directory: Path, timeout_s: float) -> None:
        self.path = directory / "build.lock"
        self.timeout_s = timeout_s
        self._file = None

    def __enter__(self) -> _BuildLock:
        self._file = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        deadline = time.monotonic() + self.timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    logger.info("Waiting for another process (pid %s) that is building the CPU kernels...",
                                self._holder() or "?")
                    announced = True
                if time.monotonic() > deadline:
                    self._file.close()
                    raise KernelBuildError(
                        f"another process (pid {self._holder() or '?'}) has held {self.path} for more than "
                        f"{self.timeout_s:.0f} s; stop it, or raise {TIMEOUT_ENV}."
                    ) from None
                time.sleep(0.2)
        previous = self._holder()
        if previous is not None and previous != os.getpid() and not _pid_alive(previous):
            logger.warning("Cleared a stale kernel build lock: process %d died while building (killed?); "
                           "building again.", previous)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def _holder(self) -> int | None:
        try:
            text = self.path.read_text().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()  # a clean exit leaves no pid behind
        self._file.close()  # releases the flock


def _compile(target: Path, timeout_s: float, command: list[str] | None = None) -> None:
    """Compile in a child process into a private folder, then move the library into place.

    `command` (tests) replaces the compiler child; it gets the folder as its last argument.
    """
    work = target.parent / f"partial-{os.getpid()}"
    for leftover in target.parent.glob("partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # of builds that were killed
    work.mkdir()
    log_path = target.parent / "build.log"
    started = time.monotonic()
    logger.info("Building tokenmill's CPU kernels (generic, AVX2 and AVX-512 paths; once per install, "
                "about 20-60 s)...")
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [*(command or [sys.executable, "-m", "tokenmill.model.kernels.build"]), str(work)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: killable whole
        )
        try:
            next_progress = started + _PROGRESS_EVERY_S
            while child.poll() is None:
                time.sleep(0.1)
                now = time.monotonic()
                if now - started > timeout_s:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                    raise KernelBuildError(
                        f"the kernel build took longer than {timeout_s:.0f} s and was stopped "
                        f"(log: {log_path}; raise {TIMEOUT_ENV} on a slow machine)."
                    )
                if now > next_progress:
                    logger.info("  ... still compiling (%.0f s)", now - started)
                    next_progress += _PROGRESS_EVERY_S
        except BaseException:
            if child.poll() is None:  # interrupted (Ctrl-C): take the compiler down too
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            shutil.rmtree(work, ignore_errors=True)
            raise
    built = work / f"{LIBRARY_NAME}.so"
    if child.returncode != 0 or not built.is_file():
        shutil.rmtree(work, ignore_errors=True)
        raise KernelBuildError(f"the compiler failed: {_first_error(log_path)} (full log: {log_path})")
    os.replace(built, target)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("Built the CPU kernels in %.0f s: %s", time.monotonic() - started, target)


def _first_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:
        if "error" in line.lower():
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def ensure_built() -> Path:
    """The kernel library's path, built first if it is not there yet.

    Raises:
        KernelBuildError: no compiler, a compile error, a timeout, or a lock held too long.
    """
    target = library_path()
    if target.is_file():
        return target
    if shutil.which(shlex.split(compiler())[0]) is None:
        raise KernelBuildError(f"no C++ compiler ({compiler()}) found; install g++ (or set CXX).")
    target.parent.mkdir(parents=True, exist_ok=True)
    timeout_s = _timeout_s()
    with _BuildLock(target.parent, timeout_s):
        if not target.is_file():  # another process may have built it while we waited
            _compile(target, timeout_s)
    return target


def _child_main(out_dir: str) -> None:
    from torch.utils.cpp_extension import load

    load(
        name=LIBRARY_NAME,
        sources=[str(_CSRC / name) for name in _SOURCES],
        build_directory=out_dir,
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=True,
    )


if __name__ == "__main__":
    _child_main(sys.argv[1])
