"""The job's paths, checked before the model loads (a compile is minutes on a large model; a
typo in --output must not cost them, nor the results computed after them)."""
from __future__ import annotations

import os
import tempfile


class OutputPathError(ValueError):
    """The output cannot be written; the message names the path and what to do."""


def check_output_path(path: str) -> bool:
    """Create the output folder if missing and check it can be written. Returns whether the
    folder was created. Writability is tested by writing, since os.access() answers yes for root
    on read-only mounts and on folders no one may write (e.g. sysfs)."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise OutputPathError(f"--output={path} is a directory; name a file in it, e.g. "
                              f"--output={os.path.join(path, 'results.jsonl')}")
    if os.path.lexists(p) and not os.path.isfile(p):
        raise OutputPathError(f"--output={path} exists and is not a regular file")
    for side in (p + ".partial", p + ".lock"):
        if os.path.isdir(side):
            raise OutputPathError(f"{side} is a directory; the job keeps its progress there: "
                                  "remove it or choose another --output")
    d = os.path.dirname(p)
    created = not os.path.isdir(d)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create the output folder {d}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".jaxserve-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write in the output folder {d}: {e.strerror or e}") from None
    if os.path.exists(p):
        try:
            open(p, "ab").close()   # no write: the file is unchanged
        except OSError as e:
            raise OutputPathError(f"the output {p} is not writable: {e.strerror or e}") from None
    return created
