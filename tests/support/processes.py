"""Processes the tests start (servers, Ray nodes): waiting until one answers, stopping it."""

import subprocess
import time
import urllib.request
from pathlib import Path


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM proc and wait for it; SIGKILL it if it is still there after timeout seconds (a no-op once it has
    exited). For the servers and nodes the tests start in subprocesses."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 30.0) -> None:
    """Wait until url answers 2xx, for a server the test started as proc (writing log); fail with that log
    if proc exits or timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} at {url} did not answer within {timeout_s} s:\n{log.read_text()}")
