"""Results of a cluster job, keyed by row id + content hash, one JSONL file per block of work.

A block's file is written whole or not at all (temporary file, fsync, rename), and its name is the
hash of its rows' keys: a worker killed mid-block leaves no trace of it, a retried block rewrites
the same file, and loading merges every file by key, so a result is never lost once written and
never counted twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterable


def row_key(rid, text: str) -> str:
    """A row's key: its id and a hash of its content (a changed line is a new row)."""
    return f"{rid}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def block_name(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24] + ".jsonl"


class BlockStore:
    def __init__(self, root: str):
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def write(self, name: str, records: dict[str, dict]) -> None:
        os.makedirs(self.root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for key, rec in records.items():
                    f.write(json.dumps({"_key": key, **rec}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read(self, name: str) -> dict[str, dict]:
        out = {}
        with open(self.path(name), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                out[rec.pop("_key")] = rec
        return out

    def blocks(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root)
                      if n.endswith(".jsonl") and not n.startswith(".tmp-"))

    def load(self) -> dict[str, dict]:
        """Every finished result, by key."""
        done: dict[str, dict] = {}
        for name in self.blocks():
            done.update(self.read(name))
        return done

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
