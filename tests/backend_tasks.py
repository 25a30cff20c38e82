"""Task functions for tests/test_backends.py: module level, so workers import them by reference."""
from __future__ import annotations

import os
import time

from gp_tasks import initialized


def pid_file_then_sleep(path, seconds):
    """Publishes this process's pid in path (atomically), then sleeps."""
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(seconds)
    return "finished"


def pid_and_initialized():
    return os.getpid(), initialized()
