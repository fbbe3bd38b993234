"""SIGTERM (spot pre-emption, scheduler time limits) turns into a checkpoint, not lost work.

The handler only sets a flag; the loop checks it after each optimizer step (agreed across ranks by the
context), writes a checkpoint and stops. Rerunning the same command resumes from it.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("distributed_ft")
_requested = threading.Event()


def _on_sigterm(signum: int, frame: object) -> None:
    del frame
    if not _requested.is_set():
        log.warning(
            "received %s: writing a checkpoint after the current step, then stopping",
            signal.Signals(signum).name,
        )
    _requested.set()


def install_stop_handler() -> bool:
    """Route SIGTERM to the stop flag; returns False where a handler cannot be installed (not main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def stop_requested_locally() -> bool:
    """Whether this process received SIGTERM."""
    return _requested.is_set()


def reset() -> None:
    """Forget a past request (tests; a resumed run in the same process)."""
    _requested.clear()
