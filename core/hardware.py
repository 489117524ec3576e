"""The machine a figure was measured on, named the same way by every benchmark and report."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in Linux's /proc/cpuinfo (None elsewhere or when absent)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(field))
    except (OSError, StopIteration):
        return None


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor id (``AuthenticAMD``, ``GenuineIntel``; Linux /proc/cpuinfo), else ``""``."""
    return _cpuinfo("vendor_id") or ""


def memory_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
