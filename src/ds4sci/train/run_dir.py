"""The run directory's safety: one run at a time (an exclusive lock), never clobber a directory
that is not a ds4sci run, and a graceful stop on SIGINT / SIGTERM.

* :class:`RunLock`: ``out_dir/.lock`` held with ``flock`` for the life of the run; the kernel
  releases it when the process ends, also after a crash or ``kill -9``, so a stale lock never
  blocks a restart. The file names the holder (pid, host, start time, command) for the message
  a second run is refused with.
* :func:`check_out_dir`: ``out_dir`` must be a directory that is empty, new, or a ds4sci run
  (only the files a run writes); a file, or a directory of the user's files, is refused.
* :class:`GracefulStop`: the first SIGINT or SIGTERM (what schedulers send before they kill)
  asks the trainer to finish the step it is in, write a checkpoint and exit with
  :data:`EXIT_STOPPED`; a second one exits at once.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import sys
from pathlib import Path

EXIT_STOPPED = 75
"""Exit status of a run stopped by a signal after its checkpoint (EX_TEMPFAIL: resume it)."""

RUN_FILES = {".lock", "config.yaml", "metrics.jsonl", "loss_curve.png", "checkpoints", "data",
             "checkpoints.replaced"}
"""What a run writes at the top of its directory (tasks may add files named in ``Task.run_files``)."""


class RunDirError(ValueError):
    """The run directory cannot be used (locked by another run, not a run, a file, ...)."""


class RunLock:
    """An exclusive lock on ``out_dir`` for this process (see the module docstring)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"out_dir {self.path.parent} is in use by another run ({holder}); wait for it "
                              f"to finish or stop it, or choose another --out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def check_out_dir(out_dir: Path, extra_files: set[str] = frozenset()) -> None:
    """Refuse an ``out_dir`` that is a file, or a non-empty directory that is not a ds4sci run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"out_dir={str(out_dir)!r} is a file; expected a directory (new, empty, or a ds4sci run)")
    if not out_dir.is_dir() or (out_dir / ".lock").is_file() or (out_dir / "checkpoints").is_dir():
        return  # new, or a ds4sci run (of any task: --overwrite and --resume decide what happens)
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in RUN_FILES | set(extra_files))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"out_dir={str(out_dir)!r} is not empty and is not a ds4sci run (it holds {shown}); "
                          f"a run writes checkpoints, metrics and data there: choose a new or empty directory")


class GracefulStop:
    """SIGINT / SIGTERM -> ``requested`` (finish the step, checkpoint, exit); a second -> exit now.
    Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.requested: str | None = None
        self._first = 0.0
        self._old = {}

    def __enter__(self) -> GracefulStop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import time

        name = signal.Signals(signum).name
        # torchrun and batch schedulers forward the signal they received to every worker, so the
        # same signal may arrive twice at once: only a later one (or a second Ctrl-C) means "now".
        if self.requested == name and time.monotonic() - self._first < 5.0 and signum != signal.SIGINT:
            return
        if self.requested is not None:
            print(f"\n{name} again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested, self._first = name, time.monotonic()
        print(f"\n{name}: finishing this step and writing a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


class RunStopped(Exception):
    """A signal stopped the run after its checkpoint (the CLI exits with :data:`EXIT_STOPPED`)."""
