"""One job per output: an exclusive `flock` on `OUTPUT.lock`, taken before the model loads.

flock rather than a pid file: the kernel drops the lock when its holder dies, SIGKILL included,
so a lock left by a dead job is simply free (its file stays behind, with the dead job's pid, host
and input, and is reported as taken over). A pid check alone cannot tell a dead job from a live
one on another host, nor a recycled pid from the job that wrote it.

The holder removes the file when it finishes. Another job may have opened the file just before,
and would then lock an unlinked inode while a third creates a new file; so after locking, a job
checks that the path still names the inode it locked, and tries again if not.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional


class OutputLocked(RuntimeError):
    """Another live job holds the lock; the message names the lock file and the holder."""


def _describe(info: dict) -> str:
    parts = []
    if info.get("pid") is not None:
        parts.append(f"pid {info['pid']}")
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("input"):
        parts.append(f"input {info['input']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    return ", ".join(parts) or "holder unknown"


class OutputLock:
    def __init__(self, output_path: str):
        # The real path: two jobs naming one output through different symlinks share one lock.
        self.path = os.path.realpath(output_path) + ".lock"
        self._fd: Optional[int] = None

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 4096)
            info = json.loads(data) if data.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self, input_path: str) -> Optional[dict]:
        """Take the lock or raise OutputLocked. Returns what a dead holder left in the file
        (a stale lock taken over), else None. OSError when the folder is not writable."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = self._read(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputLocked(
                        f"{self.path}: another job is writing this output ({_describe(info)}); "
                        "wait for it to finish, or give this job another --output") from None
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)   # the holder finished and removed the file: lock the new one
        prev = self._read(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "input": os.path.abspath(input_path),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return prev or None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)   # while still locked: see the module docstring
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def describe(info: dict) -> str:
        return _describe(info)
