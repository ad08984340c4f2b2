"""Engine core processes seen from the tests: which are alive, and waiting for them to go."""

from __future__ import annotations

import os
import time


def engine_core_pids(parent_pid: int) -> list[int]:
    """Engine core processes started by ``parent_pid`` (alive, or dead but not reaped), found
    by their command line, so that reparented ones are found too."""
    pids: list[int] = []
    if not os.path.isdir("/proc"):  # not Linux: nothing to look at
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"pagedllm.engine.core_proc" in argv and str(parent_pid).encode() in argv:
            pids.append(int(entry))
    return pids


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The processes of ``pids`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def resident_mib(pid: int) -> float:
    """The process's resident memory (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")
