"""Start `manage.py mockupstream` in a subprocess on a free port, for tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MockUpstream:
    process: subprocess.Popen
    base: str  # http://127.0.0.1:PORT

    def url(self, style: str = "openai") -> str:
        """The OpenAI-compatible base URL for one usage style."""
        return f"{self.base}/{style}/v1"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def mock_upstream_start(*args: str) -> MockUpstream:
    """Run the mock upstream with extra CLI arguments; return once it is listening."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "mockupstream", "--port", "0", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "listening on " in line:
            base = line.split("listening on ", 1)[1].strip().rstrip("/")
            return MockUpstream(process=process, base=base)
    process.wait(timeout=10)
    raise RuntimeError(f"mockupstream exited with {process.returncode} before listening")
