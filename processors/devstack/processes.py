"""The stack's child processes: free ports, pid ownership (pids get recycled), stopping."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from processors.devstack.info import StackError

STOP_TIMEOUT_S = 15.0


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LISTEN_PORTS_FROM = 20_000  # the lowest port handed out below the ephemeral range


def _ephemeral_low() -> int:
    """The kernel's lowest ephemeral port (32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports for listeners, held open together so they differ.

    Taken below the kernel's ephemeral range when there is room: a port the kernel hands out
    (``bind(0)``) can be taken again by any outgoing connection before the listener binds it,
    while one below the range is only ever taken by another listener asking for it by number.
    """
    low, high = LISTEN_PORTS_FROM, _ephemeral_low()
    socks: list[socket.socket] = []
    try:
        tries = 0
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tries += 1
            port = random.randrange(low, high) if high - low >= 1_000 and tries <= 200 else 0
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses; everything after the last ')' is safe.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def owns(pid: int, binary: str, start: int | None) -> bool:
    """True if ``pid`` is alive and still runs ``binary`` (and started when we recorded)."""
    if pid <= 0 or not _alive(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        if start is not None and proc_start_time(pid) != start:
            return False
        try:
            exe = os.readlink(proc / "exe").removesuffix(" (deleted)")
        except OSError:
            return False
        return not binary or exe == os.path.realpath(binary)
    # No /proc (macOS): fall back to ps and compare the command name.
    out = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return bool(out.strip()) and (not binary or Path(binary).name in out)


def stop_process(
    pid: int, binary: str, start: int | None, proc: subprocess.Popen[bytes] | None
) -> bool:
    """SIGTERM, wait, SIGKILL ``pid`` if it is still ours. True if it was running.

    With a ``Popen`` handle the pid is ours for sure (an unreaped child's pid cannot be reused);
    without one (another ``nudgeflow`` process started it) the pid must pass ``owns``.
    """
    if proc is not None:
        if proc.poll() is not None:
            return False
    elif not owns(pid, binary, start):
        return False
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
            if not _alive(pid):
                return True
            time.sleep(0.05)
    raise StackError(f"process {pid} ({Path(binary).name}) did not exit after SIGKILL")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def exe_of(pid: int, fallback: str) -> str:
    """The file the kernel runs for ``pid``, symlinks resolved (redis-server -> redis-check-rdb)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return os.path.realpath(fallback)
