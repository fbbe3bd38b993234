"""One preparer per cache entry: a lock file created atomically, kept fresh by a heartbeat.

The holder creates ``cache_dir/.<key>.lock`` with ``O_CREAT | O_EXCL`` (atomic on local disks and NFS) and a
thread touches it every :data:`HEARTBEAT_S`. Other processes wait on the filesystem, never in a collective,
and break a lock whose holder stopped touching it (:data:`STALE_LOCK_S`) or died on this host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("distributed_ft")

STALE_LOCK_S = 300.0
"""A lock its holder has not touched for this long is broken (the holder touches it every few seconds)."""
HEARTBEAT_S = 5.0
"""How often the lock holder sets the lock's mtime to now (a thread, while it reads and encodes)."""
POLL_S = 1.0
"""How often a waiting process looks for the manifest (and at the lock)."""
WAIT_LOG_S = 30.0
"""How often a waiting process logs whom it waits for."""


def _host() -> str:
    return socket.gethostname()


@dataclass
class CacheLock:
    """``cache_dir/.<key>.lock``, created with ``O_EXCL``; a thread touches it while it is held."""

    path: Path
    fd: int
    inode: int
    stop: threading.Event
    heartbeat: threading.Thread

    @classmethod
    def acquire(cls, path: Path) -> CacheLock | None:
        """The lock, or ``None`` when another process holds it."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        os.write(fd, json.dumps({"host": _host(), "pid": os.getpid(), "since": time.time()}).encode())
        stop = threading.Event()
        heartbeat = threading.Thread(target=_touch_until, args=(fd, path, stop), daemon=True)
        heartbeat.start()
        return cls(path, fd, os.fstat(fd).st_ino, stop, heartbeat)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, unless it is no longer ours (it was broken)."""
        self.stop.set()
        self.heartbeat.join()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        os.close(self.fd)


def _touch_until(fd: int, path: Path, stop: threading.Event) -> None:
    """Set the lock's mtime to now every :data:`HEARTBEAT_S` until ``stop`` (through the open file)."""
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(fd if os.utime in os.supports_fd else path)


def _holder(path: Path) -> tuple[str, int | None]:
    """``(host, pid)`` written in a lock file (``("?", None)`` while it is still being written)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return str(info.get("host", "?")), info.get("pid")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _stale_because(stat: os.stat_result, host: str, pid: int | None) -> str | None:
    """Why a lock is stale (not touched for :data:`STALE_LOCK_S`, or its holder here is dead), or ``None``."""
    age = time.time() - stat.st_mtime
    if age > STALE_LOCK_S:
        return f"not touched for {age:.0f} s"
    if host == _host() and pid is not None and not _alive(pid):
        return f"process {pid} is gone"
    return None


def _break(path: Path, seen: os.stat_result) -> None:
    """Rename the stale lock ``seen`` aside (atomic) and remove it; a fresh lock taken meanwhile stays."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    try:
        if os.stat(aside).st_ino != seen.st_ino:  # we moved a new holder's lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)


def wait_for_holder(lock_path: Path, published: Callable[[], bool], key: str) -> None:
    """Poll until ``published()``, the lock is released, or the lock is stale (then broken)."""
    started = time.monotonic()
    logged = started - WAIT_LOG_S
    while not published():
        try:
            stat = os.stat(lock_path)
        except FileNotFoundError:
            return
        host, pid = _holder(lock_path)
        stale = _stale_because(stat, host, pid)
        if stale is not None:
            log.warning("breaking the lock of %s:%s on %s (%s)", host, pid, key, stale)
            _break(lock_path, stat)
            return
        if time.monotonic() - logged >= WAIT_LOG_S:
            logged = time.monotonic()
            log.info(
                "waiting for %s:%s preparing %s (waited %.0f s; lock touched %.0f s ago)",
                host,
                pid,
                key,
                logged - started,
                time.time() - stat.st_mtime,
            )
        time.sleep(POLL_S)
