"""Who used the CPUs while a launched job trained: its training processes vs everything else on the machine.

On a machine whose cores the training ranks fill, any other process (an orchestrator's daemons, a
launcher's agent, a neighbour) takes its CPU time from the ranks, and in lock-step data parallelism the
slowest rank sets the pace. :class:`CpuSampler` reads every process's CPU time from ``/proc`` at a fixed
interval while a job runs; :func:`cpu_between` turns two samples into cores used in a time window
(e.g. the steady state between the warm-up and the last step), split into the job's training processes
and the rest, with the largest of the rest named. Linux only; elsewhere nothing is sampled.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Snapshot = dict[int, tuple[float, str]]
"""pid -> (CPU seconds so far, process name: the start of its command line)."""


def snapshot() -> Snapshot:
    """CPU seconds (user + system) and name of every process now."""
    out: Snapshot = {}
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone since the listing
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        name = command.strip()[:120] or stat[stat.find("(") + 1 : stat.rfind(")")]
        out[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / TICKS, name)
    return out


class CpuSampler:
    """Snapshots every ``interval`` seconds in a background thread, from :meth:`start` to :meth:`stop`."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, Snapshot]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), snapshot()))
            if self._stop.wait(self.interval):
                return

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Snapshot]]:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), snapshot()))
        return self.samples


def cpu_between(
    samples: list[tuple[float, Snapshot]],
    start: float,
    end: float,
    is_training: Callable[[str], bool],
    top: int = 3,
) -> dict[str, Any] | None:
    """Cores used from the first sample at or after ``start`` to the last at or before ``end``.

    Returns ``training_cores`` (processes ``is_training`` accepts by name), ``other_cores`` (every other
    process) and ``others``: the ``top`` largest other consumers as ``(name, cores)``; ``None`` when fewer
    than two samples fall inside the window.
    """
    inside = [(t, snap) for t, snap in samples if start <= t <= end]
    if len(inside) < 2:
        return None
    (t0, first), (t1, last) = inside[0], inside[-1]
    seconds = t1 - t0
    used = {pid: cpu - first.get(pid, (0.0, ""))[0] for pid, (cpu, _) in last.items()}
    training = sum(c for pid, c in used.items() if is_training(last[pid][1]))
    others = sorted(
        ((last[pid][1][:60], c / seconds) for pid, c in used.items() if not is_training(last[pid][1])),
        key=lambda item: -item[1],
    )
    return {
        "seconds": seconds,
        "training_cores": training / seconds,
        "other_cores": sum(c for _, c in others),
        "others": [(name, round(cores, 3)) for name, cores in others[:top]],
    }
