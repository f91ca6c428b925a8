"""How much of the machine others used while a step ran, and waiting for a quiet moment.

The machines are shared: a neighbour's test suite can halve a step's throughput. A ratio is
only worth something when both of its sides ran under similar load, so ``bench.peers``
waits for a quiet machine before each step (up to a limit) and records, for each step, the
cores others kept busy: all busy CPU time (``/proc/stat``) minus what this benchmark spent
(this process, its children once reaped, and the PostgreSQL and Redis servers it talks to,
found by their listening ports, reaped backends included).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle (nor waiting for I/O) since boot, all cores together."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def server_pids(urls: list[str]) -> list[int]:
    """Processes listening on the ports of these URLs (our PostgreSQL and Redis)."""
    import psutil

    ports = {urlsplit(u).port for u in urls} - {None}
    pids = set()
    try:
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN and conn.laddr
            if listening and conn.laddr.port in ports and conn.pid:
                pids.add(conn.pid)
    except psutil.AccessDenied:
        return []
    return sorted(pids)


def _tree_cpu(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in proc.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return 0.0
    return total


def own_cpu_seconds(servers: list[int]) -> float:
    """CPU seconds of this process, its reaped children and the servers' process trees."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return ours + sum(_tree_cpu(pid) for pid in servers)


@dataclass
class Step:
    """``with Step(servers) as s: …`` then ``s.others_cores``: the average number of cores
    others kept busy during the block."""

    servers: list[int]
    others_cores: float = 0.0
    seconds: float = 0.0

    def __enter__(self) -> Step:
        self._t = time.monotonic()
        self._busy = machine_busy_seconds()
        self._own = own_cpu_seconds(self.servers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._t
        busy = machine_busy_seconds() - self._busy
        own = own_cpu_seconds(self.servers) - self._own
        self.others_cores = max(0.0, (busy - own) / self.seconds) if self.seconds > 0 else 0.0


def wait_for_quiet(
    servers: list[int], *, max_others: float = 0.3, sample: float = 2.0, timeout: float = 120.0
) -> tuple[float, float]:
    """Until others use at most ``max_others`` cores over a ``sample``-second window, or the
    timeout. Returns (seconds waited, others' cores in the last window)."""
    start = time.monotonic()
    while True:
        with Step(servers) as step:
            time.sleep(sample)
        waited = time.monotonic() - start
        if step.others_cores <= max_others or waited >= timeout:
            return waited, step.others_cores
