"""Start, wait for and stop a real `celery worker` process: used by the demo, the tests and
the benchmarks, which all need the real thing rather than an in-process stand-in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from worker.config import get_settings


class WorkerProcess:
    """One prefork worker in its own process group (so a kill reaches its children)."""

    def __init__(
        self,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        queues: str | None = None,
        concurrency: int = 1,
        name: str = "worker",
    ) -> None:
        from worker.app import consumed_queues

        settings = get_settings()
        self.log_path = log_path
        self.env = env if env is not None else dict(os.environ)
        self.queues = queues or ",".join(consumed_queues(settings))
        self.concurrency = concurrency
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "--loglevel",
                "INFO",
                "-Q",
                self.queues,
                "--concurrency",
                str(self.concurrency),
                # Mingle and gossip only matter between many workers; skipping them saves
                # about a second at start.
                "--without-mingle",
                "--without-gossip",
                "--hostname",
                f"{self.name}-{uuid.uuid4().hex[:6]}@%h",
            ],
            env=self.env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (finish the task in hand), then a kill if it takes too long."""
        if self.proc is None or not self.alive:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 120, celery: Any = None) -> dict[str, Any]:
        """Until the worker answers the health task through the broker (``celery``: the app
        of the worker's broker, by default this process's). It is sent to the last queue the
        worker consumes (maintenance by default), where it does not wait behind a backlog of
        uploads."""
        from worker.app import TASK_HEALTH, app

        celery = celery or app
        queue = self.queues.split(",")[-1]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(
                    f"worker exited early; log {self.log_path}:\n{self.log()[-4000:]}"
                )
            try:
                answer: dict[str, Any] = celery.send_task(TASK_HEALTH, queue=queue).get(timeout=10)
                return answer
            except Exception as exc:  # not consuming yet
                last = exc
        raise RuntimeError(f"no worker answered within {timeout}s ({last}); log {self.log_path}")
