"""Crash-safe progress of a batch job: finished results are appended to `<output>.partial` and
flushed as they come, so killing the job (even SIGKILL) loses only the requests still running. A
re-run reads the log back, reuses what is done and writes the final output in one atomic rename,
so the output file itself is never half-written.

A resume trusts nothing it has not checked:

- the first line is a header naming the job (absolute input path, model source) and a random
  nonce; a log of another job, or one without a header, is refused (`--overwrite` discards it);
- every record line carries its key (input line and id), the hashes of what determined it
  (`content_key`: request, model, engine settings) and an HMAC of all of it keyed by the nonce, so
  a hand-edited, forged or corrupt record fails the check. (The nonce is in the file: this detects
  edits and damage, not an adversary who can write the folder, who could write the output too);
- a record whose hashes differ from the current request's is recomputed, and the job says why;
- a bad line is dropped and recomputed without hiding the records after it; a torn last line
  (killed mid-write) is cut; whenever something was dropped the log is rewritten cleanly (to a
  temporary file, then renamed) so that later appends stay well-formed.

A write that fails (disk full) truncates the log back to its last whole record and raises
`ResultsLogWriteError`: every record before it stays valid, and a re-run computes the rest.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from typing import Callable, Mapping, Optional

from jaxserve.io.jsonl import current_umask
from jaxserve.io.safe_json import find_unencodable, sanitize

VERSION = 2


class PartialRefused(RuntimeError):
    """The `.partial` belongs to another job (or none we can check); the message names --overwrite."""


class ResultsLogWriteError(RuntimeError):
    def __init__(self, path: str, saved: int, cause: OSError):
        self.path, self.saved, self.cause = path, saved, cause
        super().__init__(f"writing {path} failed ({cause.strerror or cause}); the {saved} results "
                         "written before it are kept")


@dataclasses.dataclass(frozen=True)
class Hashes:
    request: str
    model: str
    engine: str

    def as_json(self) -> dict:
        return {"r": self.request, "m": self.model, "e": self.engine}

    def why_differs(self, h: dict) -> Optional[str]:
        if h.get("r") != self.request:
            return "request changed"
        if h.get("m") != self.model:
            return "model changed"
        if h.get("e") != self.engine:
            return "engine settings changed"
        return None


@dataclasses.dataclass
class ResumeReport:
    found: bool = False                # a log of this job was there
    reused: int = 0
    recomputed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    torn: bool = False
    discarded: bool = False            # --overwrite / --noresume removed an existing log

    def lines(self, path: str, total: int) -> list[str]:
        out = []
        if self.discarded:
            out.append(f"discarded the earlier results in {path}")
        if not self.found:
            return out
        out.append(f"resuming from {path}: {self.reused} of {total} results reused")
        if self.recomputed:
            out.append(f"recomputing {sum(self.recomputed.values())} earlier results: "
                       + ", ".join(f"{n} {why}" for why, n in sorted(self.recomputed.items())))
        if self.dropped:
            out.append(f"dropped {sum(self.dropped.values())} records of {path} (recomputed): "
                       + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())))
        if self.torn:
            out.append(f"cut a torn last line off {path} (a write interrupted by a kill)")
        return out


def _canonical(key: str, h: dict, rec: dict) -> bytes:
    return json.dumps([key, h, rec], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


class ResultsLog:
    FSYNC_EVERY_S = 1.0   # flush() survives a killed process; fsync also covers a lost machine

    def __init__(self, output_path: str, job: Mapping[str, str]):
        """`job`: {"input": absolute input path, "model": model source}: whose log this is."""
        self.path = output_path + ".partial"
        self.job = dict(job)
        self.nonce = ""
        self.saved = 0          # whole records in the log
        self._fd: Optional[int] = None
        self._size = 0
        self._last_sync = 0.0

    @staticmethod
    def key(line_no: int, rid) -> str:
        return f"{line_no}:{rid}"

    def _sum(self, key: str, h: dict, rec: dict) -> str:
        return hmac.new(self.nonce.encode(), _canonical(key, h, rec), hashlib.sha256).hexdigest()[:32]

    # -- start: fresh, or resume what checks out ----------------------------------------------
    def start(self, expected: Mapping[str, tuple[Hashes, Callable[[dict], Optional[str]]]],
              overwrite: bool = False) -> tuple[dict[str, dict], ResumeReport]:
        """Open the log for appending. `expected` maps each current key to its hashes and a
        schema check of a record (None when it fits). Returns the reusable records and a report.
        Raises PartialRefused for another job's log (unless `overwrite`)."""
        report = ResumeReport()
        if os.path.exists(self.path) and overwrite:
            os.unlink(self.path)
            report.discarded = True
        if not os.path.exists(self.path):
            self._fresh()
            return {}, report
        done: dict[str, dict] = {}
        kept: list[bytes] = []
        with open(self.path, "rb") as f:
            first = f.readline()
            if not first.endswith(b"\n") or not f.read(1):
                # Empty, killed while writing the header, or a header without records (a job
                # that stopped before its first result): nothing to resume or to protect.
                self._fresh()
                return {}, report
            f.seek(len(first))
            self._check_header(first)
            report.found = True
            for raw in f:
                if not raw.endswith(b"\n"):
                    report.torn = True   # only the last line can lack its newline
                    break
                why, key, h, rec = self._check_line(raw, expected, done)
                if why is not None:
                    report.dropped[why] += 1
                    continue
                stale = expected[key][0].why_differs(h)
                if stale:
                    report.recomputed[stale] += 1
                    done.setdefault(key, None)   # seen: a second copy is a duplicate
                    continue
                done[key] = rec
                kept.append(raw)
        done = {k: v for k, v in done.items() if v is not None}
        report.reused = len(done)
        if report.dropped or report.recomputed or report.torn:
            self._rewrite(kept)
        else:
            self._open(len(kept))
        return done, report

    def _check_header(self, first: bytes) -> None:
        try:
            head = json.loads(first)
            ok = (isinstance(head, dict) and head.get("jaxserve_partial") == VERSION
                  and all(isinstance(head.get(k), str) for k in ("input", "model", "nonce")))
        except Exception:  # noqa: BLE001  (any unreadable header is no header)
            ok = False
        if not ok:
            raise PartialRefused(
                f"{self.path} was not written by this version of run_batch (no valid header), so "
                "its results cannot be checked; pass --overwrite to discard it (everything is "
                "recomputed)")
        if head["input"] != self.job["input"] or head["model"] != self.job["model"]:
            raise PartialRefused(
                f"{self.path} holds results of another job (input {head['input']}, model "
                f"{head['model']}); this job reads {self.job['input']} with model "
                f"{self.job['model']}. Pass --overwrite to discard those results, or choose "
                "another --output")
        self.nonce = head["nonce"]

    def _check_line(self, raw: bytes, expected, done):
        """(reason it is dropped or None, key, hashes, record)."""
        try:
            obj = json.loads(raw)
        except Exception:  # noqa: BLE001  (bad bytes, bad JSON, absurd nesting: all unreadable)
            return "unreadable line", None, None, None
        if not (isinstance(obj, dict) and set(obj) == {"k", "h", "rec", "sum"}
                and isinstance(obj["k"], str) and isinstance(obj["rec"], dict)
                and isinstance(obj["sum"], str) and isinstance(obj["h"], dict)
                and set(obj["h"]) == {"r", "m", "e"}):
            return "not a result record", None, None, None
        key, h, rec = obj["k"], obj["h"], obj["rec"]
        if not hmac.compare_digest(obj["sum"], self._sum(key, h, rec)):
            return "checksum mismatch (edited or corrupt)", None, None, None
        if key not in expected:
            return "no such line in the input any more", None, None, None
        if key in done:
            return "duplicate", None, None, None
        bad = expected[key][1](rec)
        if bad is not None:
            return f"does not fit its input line ({bad})", None, None, None
        return None, key, h, rec

    def _header(self) -> bytes:
        return (json.dumps({"jaxserve_partial": VERSION, **self.job, "nonce": self.nonce,
                            "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode()

    def _fresh(self) -> None:
        self.nonce = secrets.token_hex(16)
        self._rewrite([])

    def _rewrite(self, lines: list[bytes]) -> None:
        d = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".partial")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(self._header())
                for raw in lines:
                    f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._open(len(lines))

    def _open(self, n_records: int) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self.saved = n_records

    # -- appending -----------------------------------------------------------------------------
    def append(self, key: str, hashes: Hashes, record: dict) -> None:
        if find_unencodable(record) is not None:   # never expected: records come from checked input
            record = sanitize(record)
        h = hashes.as_json()
        line = (json.dumps({"k": key, "h": h, "rec": record, "sum": self._sum(key, h, record)},
                           ensure_ascii=False) + "\n").encode("utf-8")
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            try:   # leave the log ending in a whole record
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise ResultsLogWriteError(self.path, self.saved, e) from e
        self._size += len(line)
        self.saved += 1
        now = time.monotonic()
        if now - self._last_sync > self.FSYNC_EVERY_S:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self, remove: bool = False) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if remove and os.path.exists(self.path):
            os.unlink(self.path)
