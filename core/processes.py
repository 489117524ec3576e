"""Stopping child processes: SIGTERM first, so that each can finish what it must, SIGKILL after a grace."""
from __future__ import annotations

import subprocess
from collections.abc import Iterable


def stop_processes(processes: Iterable[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every process still running, then wait up to ``grace_s`` for each; SIGKILL (and reap) one
    that is still running after it."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
