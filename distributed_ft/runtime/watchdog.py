"""Hang detection: a per-rank watchdog that turns a silent hang into a report and a restart.

The loop beats the watchdog at every optimizer step and around its long phases (evaluation, checkpoint
save: a beat before and after, with the phase's name), so an honest long evaluation counts as a hang only
when the evaluation alone outlasts ``run.hang_timeout_s``. When no beat arrives for that long, a daemon
thread writes ``RUN_DIR/hangs/rank-N.txt`` (rank, world size, host, pid, last step, seconds since the last
beat, the phase, the last collectives this rank entered and left, the innermost frame of the thread that
runs the loop, and every thread's stack via :mod:`faulthandler`), copies it to durable storage where the
run directory is scratch (Ray), prints one line to stderr and leaves with :data:`HANG_EXIT_CODE`, so the
launcher's restart policy (``torchrun --max-restarts``, Ray's ``run.max_failures``) restarts the job from
its last checkpoint.

A rank blocked inside a collective is usually waiting for a peer that hangs elsewhere: it waits half a
timeout longer before it fires (``grace_s``), so the peer stuck outside any collective reports and exits
first and the launcher names that rank as the first failure; a waiting rank's report says ``inside
collective`` (``describe``: "waited in a collective").
Collectives are recorded by the runtime context (:class:`CollectiveLog`, a small ring buffer: no
synchronisation, no device access).

Test-only hook: ``DFT_TEST_STALL_RANK=R`` with ``DFT_TEST_STALL_AT_STEP=S`` makes rank ``R`` sleep in its
beat of step ``S`` (:func:`stall_for_test`), once per run directory (the marker ``hangs/.stalled``), so
the restarted run completes. It is for the hang tests only; nothing else reads these variables.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed_ft.runtime.context import RuntimeContext

log = logging.getLogger("distributed_ft")
HANG_EXIT_CODE = 3
"""Exit status of a rank the watchdog ended (distinct from errors, 1, and SIGTERM, 143)."""
HANGS_DIR = "hangs"
"""Directory of the run directory (and of a Ray run's storage) holding ``rank-N.txt`` reports."""
STALL_RANK_ENV, STALL_STEP_ENV = "DFT_TEST_STALL_RANK", "DFT_TEST_STALL_AT_STEP"
"""Test-only: the rank that stalls and the step at which it does (see the module docstring)."""
STALL_MARKER = ".stalled"


def report_name(rank: int) -> str:
    """``hangs/rank-N.txt``: where rank ``N``'s report lies in a run directory (and in Ray's storage)."""
    return f"{HANGS_DIR}/rank-{rank}.txt"


class CollectiveLog:
    """The last collectives a rank entered and left: ``(name, monotonic time, "entered" | "left")``.

    A deque under a lock: two appends per collective, nothing else, so recording costs no
    synchronisation with other ranks or with the device.
    """

    def __init__(self, size: int = 16) -> None:
        self._events: deque[tuple[str, float, str]] = deque(maxlen=size)
        self._lock = threading.Lock()

    @contextmanager
    def track(self, name: str) -> Iterator[None]:
        """Record entering ``name`` now and leaving it when the block ends (also by an exception)."""
        with self._lock:
            self._events.append((name, time.monotonic(), "entered"))
        try:
            yield
        finally:
            with self._lock:
                self._events.append((name, time.monotonic(), "left"))

    def events(self) -> list[tuple[str, float, str]]:
        """The recorded events, oldest first."""
        with self._lock:
            return list(self._events)


def describe_collective(event: tuple[str, float, str] | None, now: float, last: bool = True) -> str:
    """``all_reduce (left 4.9 s ago)``, ``barrier (entered 5.0 s ago, inside collective)`` or ``none``.

    ``last``: the rank's latest event (an ``entered`` one then means the rank is still inside).
    """
    if event is None:
        return "none"
    name, at, what = event
    inside = ", inside collective" if last and what == "entered" else ""
    return f"{name} ({what} {now - at:.1f} s ago{inside})"


@dataclass
class HangReport:
    """What the watchdog found when it fired; :meth:`header` is the top of ``hangs/rank-N.txt``."""

    rank: int
    world_size: int
    host: str
    pid: int
    step: int
    idle_s: float
    phase: str
    timeout_s: float
    last_collective: str
    stuck_frame: str
    """The innermost frame of the thread that runs the loop: where it waits or spins."""
    library_frame: str
    """The innermost of those frames in ``distributed_ft`` (e.g. the collective it waits in)."""
    path: Path
    collectives: list[str] = field(default_factory=list)
    time: float = field(default_factory=time.time)

    def header(self) -> str:
        fields = {
            "rank": self.rank,
            "world_size": self.world_size,
            "host": self.host,
            "pid": self.pid,
            "last_step": self.step,
            "seconds_since_beat": f"{self.idle_s:.1f}",
            "phase": self.phase,
            "timeout_s": self.timeout_s,
            "last_collective": self.last_collective,
            "stuck_frame": self.stuck_frame,
            "library_frame": self.library_frame,
            "time": f"{self.time:.3f}",
        }
        return "".join(f"{key}: {value}\n" for key, value in fields.items())

    def line(self) -> str:
        """The one line a hung rank prints to stderr."""
        return (
            f"rank {self.rank}: no step progress for {self.idle_s:.1f} s (phase {self.phase}, "
            f"last collective {self.last_collective}); stacks in {self.path}"
        )


def parse_report(text: str) -> dict[str, str]:
    """The ``key: value`` header of a ``hangs/rank-N.txt`` report."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def describe(fields: dict[str, str], location: str) -> str:
    """One line on a report for the Ray driver: the rank, its stuck frame, whether it waited on a peer."""
    waiting = "inside collective" in fields.get("last_collective", "")
    what = "waited in a collective (for a peer)" if waiting else "hung"
    return (
        f"rank {fields.get('rank', '?')} {what} at step {fields.get('last_step', '?')} "
        f"(phase {fields.get('phase', '?')}, {fields.get('seconds_since_beat', '?')} s without progress): "
        f"stuck in {fields.get('stuck_frame', '?')} (in distributed_ft: {fields.get('library_frame', '?')}); "
        f"last collective {fields.get('last_collective', '?')}; "
        f"stacks in {location}"
    )


def exit_on_hang(report: HangReport) -> None:
    """The default action: say so on stderr and leave at once (no cleanup: peers may be stuck)."""
    sys.stderr.write(report.line() + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(HANG_EXIT_CODE)


PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _frame_text(frame) -> str:
    code = frame.f_code
    return f"{code.co_name} ({code.co_filename}:{frame.f_lineno})"


def _library_frame(frame) -> str:
    """The innermost frame from ``frame`` outwards whose code is part of this package."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return _frame_text(frame)
        frame = frame.f_back
    return "none"


class Watchdog:
    """Fires when :meth:`beat` has not been called for ``timeout_s`` seconds between start and stop.

    Args:
        timeout_s: Seconds without a beat that count as a hang; ``None``: an inert watchdog (no thread).
        run_dir: The run directory; the report goes to ``run_dir/hangs/rank-N.txt``.
        collectives: The rank's collective log (``context.collectives``), for the report.
        on_hang: What happens after the report is written (default :func:`exit_on_hang`; tests pass a
            callback).
        publish: Copies the written report to durable storage (Ray); ``None``: the run directory is durable.
        grace_s: Extra seconds a rank waiting inside a collective gives its peers (default: half the
            timeout).
    """

    def __init__(
        self,
        timeout_s: float | None,
        run_dir: Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        collectives: CollectiveLog | None = None,
        on_hang: Callable[[HangReport], None] = exit_on_hang,
        publish: Callable[[Path], None] | None = None,
        poll_s: float | None = None,
        grace_s: float | None = None,
    ) -> None:
        self.timeout_s, self.run_dir, self.rank, self.world_size = timeout_s, Path(run_dir), rank, world_size
        self.collectives, self.on_hang, self.publish = collectives, on_hang, publish
        self.poll_s = poll_s if poll_s is not None else min(1.0, (timeout_s or 1.0) / 10)
        self.grace_s = grace_s if grace_s is not None else (timeout_s or 0.0) / 2
        self.path = self.run_dir / report_name(rank)
        self.step, self.phase, self._last = 0, "train", time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None
        self._stop = threading.Event()
        self._stall_at = _stall_step(rank)

    @classmethod
    def for_run(cls, timeout_s: float | None, run_dir: Path, context: RuntimeContext) -> Watchdog:
        """The watchdog of one rank of a run (inert when ``run.hang_timeout_s`` is ``None``).

        Where the context keeps the run's files elsewhere (Ray: ``run.storage_path``), the report is
        uploaded there before the rank exits.
        """
        from distributed_ft.runtime import storage

        name = report_name(context.rank)
        location = context.durable_location(run_dir, name)
        publish = None
        if location != str(run_dir / name):

            def publish(path: Path) -> None:
                storage.upload(path, location)

        return cls(
            timeout_s,
            run_dir,
            rank=context.rank,
            world_size=context.world_size,
            collectives=context.collectives,
            publish=publish,
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start watching the calling thread (the loop's); a beat counts from now."""
        if self.timeout_s is None or self.running:
            return
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="dft-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the thread ends); beats after this are only recorded."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def beat(self, step: int | None = None, phase: str | None = None) -> None:
        """Progress: an optimizer step (``step``), or entering a long phase (``phase``: its name)."""
        self._last = time.monotonic()
        if step is not None:
            self.step = step
            self.phase = "train"
        if phase is not None:
            self.phase = phase
        if step is not None and step == self._stall_at:
            stall_for_test(self.run_dir, self.timeout_s or 1.0)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if self.timeout_s is None or idle < self.timeout_s:
                continue
            if idle >= self.timeout_s + self.grace_s or not self._inside_collective():
                self._fire(idle)
                return

    def _inside_collective(self) -> bool:
        events = self.collectives.events() if self.collectives is not None else []
        return bool(events) and events[-1][2] == "entered"

    def _fire(self, idle: float) -> None:
        report = self.report(idle)
        try:
            self.write(report)
        except OSError as exc:  # a full or gone disk must not keep a hung rank alive
            sys.stderr.write(f"rank {self.rank}: the hang report {self.path} could not be written: {exc}\n")
        if self.publish is not None and self.path.is_file():
            try:
                self.publish(self.path)
            except Exception as exc:  # storage unreachable: the local report and the exit still matter
                sys.stderr.write(f"rank {self.rank}: the hang report could not be uploaded: {exc}\n")
        self.on_hang(report)

    def report(self, idle: float) -> HangReport:
        """What this rank looks like now (the loop thread's innermost frame, the last collectives)."""
        now = time.monotonic()
        events = self.collectives.events() if self.collectives is not None else []
        frame = sys._current_frames().get(self._loop_thread or threading.main_thread().ident or 0)
        return HangReport(
            rank=self.rank,
            world_size=self.world_size,
            host=socket.gethostname(),
            pid=os.getpid(),
            step=self.step,
            idle_s=idle,
            phase=self.phase,
            timeout_s=self.timeout_s or 0.0,
            last_collective=describe_collective(events[-1] if events else None, now),
            stuck_frame=_frame_text(frame) if frame is not None else "unknown (loop thread gone)",
            library_frame=_library_frame(frame),
            path=self.path,
            collectives=[describe_collective(event, now, last=False) for event in events],
        )

    def write(self, report: HangReport) -> None:
        """Write ``hangs/rank-N.txt``: the header, the collectives, the loop's stack, every thread's stack."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        frames = sys._current_frames()
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        with self.path.open("w") as out:
            out.write(report.header() + "\n")
            out.write("last collectives (oldest first):\n")
            out.writelines(f"  {line}\n" for line in report.collectives or ["none recorded"])
            loop = frames.get(self._loop_thread or 0)
            if loop is not None:
                out.write(f"\nloop thread {names.get(self._loop_thread, '?')} (most recent call last):\n")
                out.writelines(traceback.format_stack(loop))
            out.write("\nthreads:\n")
            out.writelines(f"  0x{ident:016x} {names.get(ident, '?')}\n" for ident in frames)
            out.write("\nall threads (faulthandler, most recent call first):\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)


def _stall_step(rank: int) -> int | None:
    """Test-only: the step at which this rank stalls (``DFT_TEST_STALL_RANK`` / ``_AT_STEP``), or ``None``."""
    if os.environ.get(STALL_RANK_ENV) != str(rank) or not os.environ.get(STALL_STEP_ENV, "").isdigit():
        return None
    return int(os.environ[STALL_STEP_ENV])


def stall_for_test(run_dir: Path, timeout_s: float) -> None:
    """Test-only: sleep far past the timeout, once per run directory (the restarted run goes on)."""
    marker = Path(run_dir) / HANGS_DIR / STALL_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log.warning("test hook %s: stalling this rank", STALL_RANK_ENV)
    time.sleep(max(30.0, 10 * timeout_s))  # the watchdog ends the process long before
