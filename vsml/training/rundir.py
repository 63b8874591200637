"""Run directories: exclusive creation, a lock held for the run's life, output checks, metrics repair.

* :func:`check_out_dir` — before anything is created: ``out_dir`` exists (or can be made) and a file
  can be written in it.
* :func:`create_run_dir` — ``out_dir/NAME`` (or ``NAME-2``, ``NAME-3``, ... when an earlier run holds
  the name) created with an exclusive ``mkdir`` and locked before it is visible as free; the choice is
  serialised between processes by a lock on ``out_dir/.vsml-create.lock``, so two runs started
  together with one ``--name`` never share a folder.  A run of that name that is *still running*
  is an error (a double launch), not a silent ``-2``.
* :class:`RunLock` — ``fcntl.flock`` on ``<run>/.lock`` (the holder's pid written inside), held until
  :meth:`RunLock.release` or the process ends (the OS drops it on exit, crash or ``kill -9``).  A
  second process on the same run directory, by ``--name``, ``--resume`` or torchrun, gets a
  :class:`RunDirError`.
* :func:`truncate_metrics` — on resume, ``metrics.jsonl`` is cut back to the checkpoint's step so
  the steps run again after a crash are not logged twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from vsml.engine.config import ConfigError

LOCK_NAME = ".lock"
CREATE_LOCK_NAME = ".vsml-create.lock"
FINISHED_NAME = "finished.json"      # written after the final meta-test: the run is complete

# errors of a full / read-only / forbidden output filesystem: one clear line, not a traceback
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class RunDirError(ConfigError):
    """The run directory cannot be created, is in use, or its filesystem refuses a write."""


def disk_error_message(exc: OSError, what: str) -> str:
    """One line for an OSError raised while writing ``what``."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}.get(
        exc.errno, os.strerror(exc.errno) if exc.errno else str(exc))
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return f"cannot write {what}: {reason}{where}"


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Make sure ``out_dir`` exists (creating it and its parents) and accepts a new file."""
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".vsml-write-test.", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        msg = disk_error_message(exc, f"to --out_dir {str(p)!r}") if exc.errno in DISK_ERRNOS or \
            isinstance(exc, (FileExistsError, NotADirectoryError)) else f"cannot use --out_dir {str(p)!r}: {exc}"
        raise RunDirError(f"{msg}; pass a writable folder with --out_dir") from None
    return p


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` (released by the OS if the process dies)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @staticmethod
    def holder(run_dir: str | os.PathLike) -> str | None:
        """The pid written in a run's lock file if some process holds its lock, else None."""
        path = Path(run_dir) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None               # no lock file: nobody ever locked it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(disk_error_message(exc, f"the lock file {self.path}") +
                              "; pass a writable folder with --out_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"run directory {self.run_dir} is in use by another process (pid {pid}); wait for "
                              "it to finish (or stop it), or start a separate run with another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextmanager
def _creation_lock(out_dir: Path):
    """Serialise run-directory choice between processes sharing ``out_dir`` (blocking, held briefly)."""
    fd = os.open(out_dir / CREATE_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def create_run_dir(out_dir: str | os.PathLike, name: str) -> tuple[Path, RunLock]:
    """Create and lock a fresh run directory ``out_dir/name`` (``name-2``, ... if taken); see module doc."""
    out = check_out_dir(out_dir)
    base = out / name
    try:
        with _creation_lock(out):
            pid = RunLock.holder(base)
            if pid is not None:
                raise RunDirError(f"a run named {name!r} is still running in {base} (pid {pid}); wait for it to "
                                  "finish, or pass another --name")
            i = 1
            while True:
                cand = base if i == 1 else Path(f"{base}-{i}")
                try:
                    os.mkdir(cand)          # exclusive: fails if the folder exists
                except FileExistsError:
                    # an empty folder (no run ever wrote there, not even its lock) may be taken over
                    if not cand.is_dir() or any(cand.iterdir()):
                        i += 1
                        continue
                lock = RunLock(cand).acquire()
                return cand, lock
    except RunDirError:
        raise
    except OSError as exc:
        raise RunDirError(disk_error_message(exc, f"the run directory in {str(out)!r}") +
                          "; pass a writable folder with --out_dir") from None


def lock_existing_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Lock the run directory of a resume (or of torchrun's fixed ``out_dir/name``), creating it if needed."""
    rd = Path(run_dir)
    try:
        rd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(disk_error_message(exc, f"the run directory {rd}") +
                          "; pass a writable folder with --out_dir") from None
    return RunLock(rd).acquire()


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``step`` (and any torn last line); returns
    how many were dropped.  Rows of step <= ``step`` are the checkpoint's history and stay."""
    from vsml.training.checkpoint import atomic_write_text
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            s = int(row["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1              # a line torn by a kill mid-write
            continue
        if s <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped


def read_finished(run_dir: str | os.PathLike) -> int | None:
    """The step recorded by a completed run (after its final meta-test), else None."""
    try:
        return int(json.loads((Path(run_dir) / FINISHED_NAME).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_finished(run_dir: str | os.PathLike, step: int) -> None:
    from vsml.training.checkpoint import atomic_write_text
    atomic_write_text(Path(run_dir) / FINISHED_NAME, json.dumps({"step": int(step)}) + "\n")


def remove_finished(run_dir: str | os.PathLike) -> None:
    try:
        (Path(run_dir) / FINISHED_NAME).unlink()
    except FileNotFoundError:
        pass
