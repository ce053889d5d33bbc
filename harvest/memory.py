"""Sizes checked before allocation: a run that cannot fit fails at once with one line (the memory it needs,
what is available, what to lower) instead of an out-of-memory traceback, or the kernel's OOM killer, minutes
later.

Available memory: on a GPU, torch.cuda.mem_get_info; on the CPU, MemAvailable of /proc/meminfo (os.sysconf
elsewhere), capped by the cgroup's limit when the process runs in a container with one.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError, human_bytes


class MemoryNeeded(UserError):
    """An allocation the run is about to make exceeds the memory available."""


def _cgroup_room() -> int | None:
    """Bytes this cgroup (v2) may still allocate, or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def host_available() -> int | None:
    """Bytes of RAM a new allocation can use now (None if unknown)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    room = _cgroup_room()
    return avail if room is None else min(avail, max(room, 0))


def available(device: str) -> int | None:
    """Bytes free on `device` ("cpu", "cuda", "cuda:N"); None if unknown."""
    if str(device).startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    return host_available()


def require(need: float, device: str, what: str, lower: str) -> None:
    """MemoryNeeded unless `need` bytes fit on `device`: `what` needs them, `lower` says what makes it smaller."""
    free = available(device)
    if free is not None and need > free:
        where = "GPU" if str(device).startswith("cuda") else "RAM"
        raise MemoryNeeded(
            f"{what} needs ~{human_bytes(need)} of {where} on {device}, {human_bytes(free)} are available: "
            f"lower {lower}"
        )
