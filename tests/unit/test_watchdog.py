"""The hang watchdog: it fires after the timeout without beats, names the stuck frame, quiet on beats."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from distributed_ft.runtime import watchdog as wd
from distributed_ft.runtime.context import ProcessGroupContext
from distributed_ft.runtime.watchdog import CollectiveLog, HangReport, Watchdog


def _blocked_in_test(dog: Watchdog, release: threading.Event) -> None:
    """The deliberately blocked 'loop': starts the watchdog, beats once, then makes no progress."""
    dog.start()
    dog.beat(step=7)
    dog.beat(phase="evaluation")
    while not release.is_set():
        time.sleep(0.01)


def _fire(dog: Watchdog, fired: threading.Event, timeout: float = 10.0) -> float:
    """Run the blocked loop in a thread until the watchdog fires; seconds until it did."""
    release = threading.Event()
    loop = threading.Thread(target=_blocked_in_test, args=(dog, release), name="loop")
    started = time.monotonic()
    loop.start()
    try:
        assert fired.wait(timeout), "the watchdog did not fire"
        return time.monotonic() - started
    finally:
        release.set()
        loop.join()
        dog.stop()


def test_fires_after_the_timeout_and_writes_the_stuck_frame_and_collectives(tmp_path):
    collectives = CollectiveLog(size=4)
    for name in ("broadcast_object", "barrier", "all_reduce(sum)"):
        with collectives.track(name):
            pass
    reports: list[HangReport] = []
    fired = threading.Event()
    dog = Watchdog(
        0.4,
        tmp_path,
        rank=1,
        world_size=2,
        collectives=collectives,
        on_hang=lambda report: (reports.append(report), fired.set()),
    )
    seconds = _fire(dog, fired)
    assert 0.4 <= seconds < 5
    (report,) = reports
    assert (report.rank, report.world_size, report.step, report.phase) == (1, 2, 7, "evaluation")
    assert report.idle_s >= 0.4
    assert report.stuck_frame.startswith("_blocked_in_test (")
    assert report.last_collective.startswith("all_reduce(sum) (left ")
    assert len(report.collectives) == 4  # a ring buffer: the oldest events dropped
    text = (tmp_path / "hangs" / "rank-1.txt").read_text()
    fields = wd.parse_report(text)
    assert fields["rank"] == "1" and fields["world_size"] == "2" and fields["last_step"] == "7"
    assert fields["phase"] == "evaluation" and fields["stuck_frame"].startswith("_blocked_in_test")
    assert {"host", "pid", "seconds_since_beat", "last_collective", "time"} <= fields.keys()
    assert "barrier (left" in text and "all_reduce(sum) (left" in text
    assert "loop thread loop (most recent call last):" in text
    assert "all threads (faulthandler" in text and "in _blocked_in_test" in text.split("faulthandler")[1]
    assert "rank 1: no step progress for" in report.line() and str(report.path) in report.line()


def test_a_rank_waiting_inside_a_collective_lets_the_stuck_peer_report_first(tmp_path):
    """Inside a collective the rank waits ``grace_s`` longer: the peer hung elsewhere exits first."""
    collectives = CollectiveLog()
    reports: list[HangReport] = []
    fired = threading.Event()
    dog = Watchdog(
        0.3,
        tmp_path,
        collectives=collectives,
        grace_s=0.6,
        poll_s=0.02,
        on_hang=lambda report: (reports.append(report), fired.set()),
    )
    with collectives.track("barrier"):
        seconds = _fire(dog, fired)
    assert seconds >= 0.9
    assert reports[0].last_collective.startswith("barrier (entered")
    assert reports[0].last_collective.endswith("inside collective)")
    line = wd.describe(wd.parse_report(dog.path.read_text()), "STORAGE/hangs/rank-0.txt")
    assert line.startswith("rank 0 waited in a collective (for a peer) at step 7")


def test_does_not_fire_while_beats_arrive_nor_after_stop(tmp_path):
    fired = threading.Event()
    dog = Watchdog(0.3, tmp_path, on_hang=lambda report: fired.set(), poll_s=0.02)
    dog.start()
    for step in range(40):  # 1.2 s of steps, each well inside the timeout
        time.sleep(0.03)
        dog.beat(step)
    dog.stop()
    assert not dog.running
    time.sleep(0.5)
    assert not fired.is_set() and not (tmp_path / "hangs").exists()


def test_a_long_phase_counts_from_its_own_beat(tmp_path):
    """An evaluation that takes longer than the steps but less than the timeout is no hang."""
    fired = threading.Event()
    dog = Watchdog(0.5, tmp_path, on_hang=lambda report: fired.set(), poll_s=0.02)
    dog.start()
    time.sleep(0.3)
    dog.beat(phase="evaluation")
    time.sleep(0.35)  # 0.65 s since the start, 0.35 s since the phase's beat
    dog.beat(phase="train")
    dog.stop()
    assert not fired.is_set()


def test_without_a_timeout_the_watchdog_is_inert(tmp_path):
    dog = Watchdog(None, tmp_path, on_hang=lambda report: pytest.fail("fired"))
    dog.start()
    assert not dog.running
    dog.beat(3)
    dog.stop()


def test_collectives_are_recorded_entered_and_left_also_on_errors():
    log = CollectiveLog()
    with pytest.raises(RuntimeError), log.track("barrier"):
        raise RuntimeError("peer gone")
    assert [(name, what) for name, _, what in log.events()] == [("barrier", "entered"), ("barrier", "left")]
    with log.track("all_reduce(sum)"):
        inside = wd.describe_collective(log.events()[-1], time.monotonic())
    assert inside.startswith("all_reduce(sum) (entered") and inside.endswith("inside collective)")
    assert wd.describe_collective(None, 0.0) == "none"


class _ScratchContext(ProcessGroupContext):
    """A context whose run directory is scratch: files are kept under ``storage`` (as Ray's)."""

    def __init__(self, storage: Path) -> None:
        super().__init__(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
        self.storage = storage

    def durable_location(self, run_dir: Path, name: str) -> str:
        return str(self.storage / name)


def test_the_report_is_uploaded_where_the_run_is_kept_and_the_driver_names_the_rank(tmp_path):
    from distributed_ft.backends.ray_train import report_hangs

    storage = tmp_path / "storage"
    fired = threading.Event()
    started = time.time()
    dog = Watchdog.for_run(0.3, tmp_path / "scratch", _ScratchContext(storage))
    dog.on_hang = lambda report: fired.set()
    with dog.collectives.track("all_reduce(sum)"):
        pass
    _fire(dog, fired)
    assert (storage / "hangs" / "rank-1.txt").is_file()
    lines = report_hangs(str(storage), tmp_path / "driver", num_workers=2, since=started)
    (line,) = lines
    assert line.startswith("rank 1 hung at step 7 (phase evaluation")
    assert "stuck in _blocked_in_test" in line and "all_reduce(sum) (left" in line
    assert (tmp_path / "driver" / "hangs" / "rank-1.txt").is_file()
    assert report_hangs(str(storage), tmp_path / "driver", num_workers=2, since=time.time() + 60) == []


def test_a_local_context_keeps_the_report_in_the_run_directory(tmp_path):
    from distributed_ft.runtime.context import LocalContext

    dog = Watchdog.for_run(5.0, tmp_path, LocalContext())
    assert dog.publish is None and dog.path == tmp_path / "hangs" / "rank-0.txt"


def test_the_test_stall_hook_is_read_for_its_rank_only_and_runs_once_per_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(wd.STALL_RANK_ENV, "1")
    monkeypatch.setenv(wd.STALL_STEP_ENV, "3")
    assert wd._stall_step(1) == 3 and wd._stall_step(0) is None
    marker = tmp_path / "hangs" / wd.STALL_MARKER
    marker.parent.mkdir()
    marker.write_text("0")  # stalled once already: the restarted run goes on
    dog = Watchdog(5.0, tmp_path, rank=1)
    started = time.monotonic()
    dog.beat(3)
    assert time.monotonic() - started < 1


def test_by_default_the_hung_process_says_so_and_exits_with_the_hang_code(tmp_path):
    code = (
        "import time, sys; from distributed_ft.runtime.watchdog import Watchdog\n"
        "def stuck_here():\n"
        "    time.sleep(30)\n"
        f"dog = Watchdog(0.5, {str(tmp_path)!r}, rank=0, world_size=1); dog.start(); stuck_here()\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 20
    assert done.returncode == wd.HANG_EXIT_CODE, done.stderr
    assert "rank 0: no step progress for" in done.stderr
    assert "(phase train, last collective none); stacks in" in done.stderr
    assert wd.parse_report((tmp_path / "hangs" / "rank-0.txt").read_text())["stuck_frame"].startswith(
        "stuck_here ("
    )
