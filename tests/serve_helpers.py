"""A real ``fewstep serve`` process on a free loopback port, for the server and browser tests."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fewstep.models.folders import shipped_models_dir

MODELS = shipped_models_dir()
ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 180.0):
    """Start ``fewstep serve --port 0 ARGS`` and yield (its URL, its process); stopped with SIGINT after."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fewstep", "serve", "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"on (http://\S+/)", line)
            if match and not url:
                url.append(match.group(1))
                found.set()
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("fewstep serve did not start:\n" + "".join(lines))
    try:
        yield url[0], proc, lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
