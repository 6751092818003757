"""Crash-safe progress of a batch job: finished results are appended to `<output>.partial` and
flushed as they come, so killing the job (even SIGKILL) loses only the requests still running. A
re-run reads the log back, skips what is done and writes the final output in one atomic rename, so
the output file itself is never half-written.

Records are keyed by input line and id, so duplicate ids in the input still count once each.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional


class ResultsLog:
    FSYNC_EVERY_S = 1.0   # flush() survives a killed process; fsync also covers a lost machine

    def __init__(self, output_path: str):
        self.path = output_path + ".partial"
        self._f = None
        self._last_sync = 0.0

    @staticmethod
    def key(line_no: int, rid) -> str:
        return f"{line_no}:{rid}"

    def load(self) -> dict[str, dict]:
        """Records already done. A torn last line (killed mid-write) is cut off the log."""
        done: dict[str, dict] = {}
        if not os.path.exists(self.path):
            return done
        good_end = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                    key = rec.pop("_key")
                except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                    break
                done[key] = rec
                good_end += len(raw)
        if good_end != os.path.getsize(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        return done

    def append(self, key: str, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps({"_key": key, **record}, ensure_ascii=False) + "\n")
        self._f.flush()
        now = time.monotonic()
        if now - self._last_sync > self.FSYNC_EVERY_S:
            os.fsync(self._f.fileno())
            self._last_sync = now

    def close(self, remove: bool = False) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
        if remove and os.path.exists(self.path):
            os.unlink(self.path)
