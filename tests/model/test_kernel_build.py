"""Building the CPU kernel library: locks a killed build cannot leave behind, timeouts,
clear failures, and TOKENMILL_CPU_KERNELS=require.

The compiler child is replaced by small scripts here (a real build takes a minute; the
suite builds the real library once, and test_cpu_kernels.py tests what it built).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from tokenmill.model.kernels import build

HOLD_LOCK = """
import sys, time
from pathlib import Path
from tokenmill.model.kernels.build import _BuildLock
with _BuildLock(Path(sys.argv[1]), 5):
    (Path(sys.argv[1]) / "partial-held").mkdir()
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(directory):
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_build_killed_while_holding_the_lock_does_not_block_the_next(tmp_path, caplog):
    holder = _hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)  # as an OOM kill or a container stop would
    holder.wait()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tokenmill.model.kernels"):
        with build._BuildLock(tmp_path, timeout_s=5):
            assert time.monotonic() - started < 2
    assert f"stale kernel build lock: process {holder.pid} died" in caplog.text
    # ... and the next build clears the half-built folder it left.
    script = "import pathlib, sys; (pathlib.Path(sys.argv[1]) / 'tokenmill_cpu_kernels.so').write_bytes(b'')"
    build._compile(tmp_path / "tokenmill_cpu_kernels.so", 30, [sys.executable, "-c", script])
    assert not list(tmp_path.glob("partial-*"))
    assert (tmp_path / "tokenmill_cpu_kernels.so").is_file()


def test_waiting_for_a_live_builder_times_out_with_its_pid(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(build.KernelBuildError, match=rf"pid {holder.pid}\) has held .* more than 1 s"):
            with build._BuildLock(tmp_path, timeout_s=1):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_compile_past_the_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # The child starts a grandchild (as ninja starts the compiler) and both would sleep.
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(build.KernelBuildError, match="longer than 1 s and was stopped"):
        build._compile(tmp_path / "lib.so", 1, [sys.executable, "-c", script])
    assert time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert _is_gone(grandchild)


def _is_gone(pid: int) -> bool:
    """Exited, or killed and left unreaped (a zombie: its parent died first)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def test_a_compile_error_names_the_first_error_and_the_log(tmp_path):
    script = "import sys; print('compiling...'); print('x.cpp:1:2: error: boom'); sys.exit(1)"
    with pytest.raises(build.KernelBuildError, match=r"x.cpp:1:2: error: boom \(full log: .*build.log\)"):
        build._compile(tmp_path / "lib.so", 30, [sys.executable, "-c", script])


@pytest.mark.parametrize(("mode", "exit_code"), [("require", 1), ("auto", 0)])
def test_require_turns_a_failed_build_into_an_error(tmp_path, mode, exit_code):
    env = dict(os.environ, TOKENMILL_CPU_KERNELS=mode, CXX="no-such-compiler", XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "kernels", "build"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == exit_code, result.stderr
    assert "no C++ compiler (no-such-compiler) found" in result.stderr
    if mode == "auto":
        assert "using PyTorch ops" in result.stderr
