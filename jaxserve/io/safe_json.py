"""Bounded parsing of one untrusted JSON line, and strings that survive being written back.

`json.loads` alone lets one line take down a whole batch: a 5,000-digit integer raises ValueError
(Python's int-string limit), 100,000 nested `[` raise RecursionError, `NaN` / `1e999` parse to
floats that cannot be written back as JSON, and a `\\udc80` escape parses to a lone surrogate that
UTF-8 cannot encode (so the record echoing it cannot be written). Here each of these is a
`LineError` naming the problem, which the caller turns into that line's error record.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

MAX_DEPTH = 64            # nesting of arrays/objects; real requests use 3 or 4
MAX_INT_DIGITS = 100      # the largest integer a request needs is a 64-bit seed (20 digits)


class LineError(ValueError):
    """A line that cannot be used; the message says why (without the line number). `obj` is what
    could be parsed (None if nothing), so that the error record can still carry the line's id."""

    def __init__(self, msg: str, obj: Any = None):
        super().__init__(msg)
        self.obj = obj


class _Rejected:
    """Stands in for a value the parser refused, so that the error can name its field."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


def _hooks(rejected: list):
    def parse_int(s: str):
        digits = len(s) - (s[0] == "-")
        if digits > MAX_INT_DIGITS:
            rejected.append(_Rejected(f"an integer of {digits} digits (at most {MAX_INT_DIGITS} "
                                      "are accepted)"))
            return rejected[-1]
        return int(s)

    def parse_float(s: str):
        v = float(s)
        if not math.isfinite(v):
            rejected.append(_Rejected(f"the number {s[:40]} is out of range (it would be written "
                                      "back as Infinity, which is not JSON)"))
            return rejected[-1]
        return v

    def parse_constant(s: str):
        rejected.append(_Rejected(f"'{s}' is not JSON (NaN and Infinity cannot be written back)"))
        return rejected[-1]

    return parse_int, parse_float, parse_constant


def _find_rejected(obj, path=""):
    if isinstance(obj, _Rejected):
        return path or "(top level)", obj
    items = enumerate(obj) if isinstance(obj, list) else obj.items() if isinstance(obj, dict) else ()
    for k, v in items:
        r = _find_rejected(v, f"{path}[{k}]" if isinstance(obj, list) else (f"{path}.{k}" if path else k))
        if r:
            return r
    return None


def _strip_rejected(obj):
    if isinstance(obj, _Rejected):
        return None
    if isinstance(obj, list):
        return [_strip_rejected(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _strip_rejected(v) for k, v in obj.items()}
    return obj


# A JSON string literal (unrolled loop: linear, no backtracking) and the brackets outside strings.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str, max_depth: int) -> None:
    # Cheap bound first: a line with few brackets cannot nest deeply (the common case).
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise LineError(f"nested more than {max_depth} levels deep")
        else:
            depth -= 1


def loads_line(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one line; every failure is a LineError (never ValueError/RecursionError/...)."""
    _check_depth(text, max_depth)
    rejected: list = []
    parse_int, parse_float, parse_constant = _hooks(rejected)
    try:
        obj = json.loads(text, parse_int=parse_int, parse_float=parse_float,
                         parse_constant=parse_constant)
    except json.JSONDecodeError as e:
        raise LineError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise LineError("nested too deeply") from None
    except (ValueError, TypeError) as e:   # whatever else the decoder may raise
        raise LineError(f"malformed JSON ({e})") from None
    if rejected:
        path, r = _find_rejected(obj)
        raise LineError(f"field '{path}': {r.why}", _strip_rejected(obj))
    return obj


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def escape_surrogates(s: str) -> str:
    """`s` with each lone surrogate written as the text `\\udc80`, so it can be encoded."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def sanitize(obj: Any) -> Any:
    """`obj` with every string (keys included) passed through `escape_surrogates`."""
    if isinstance(obj, str):
        return escape_surrogates(obj) if _has_surrogate(obj) else obj
    if isinstance(obj, list):
        return [sanitize(x) for x in obj]
    if isinstance(obj, dict):
        return {sanitize(k): sanitize(v) for k, v in obj.items()}
    return obj


def find_unencodable(obj: Any, path: str = "") -> Optional[tuple[str, str]]:
    """(field path, the offending character as `\\udc80`) of the first string that UTF-8
    cannot encode, or None. Checked in C first: the walk only runs for a line that fails."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    return _walk(obj, path)


def _walk(obj, path):
    if isinstance(obj, str):
        if _has_surrogate(obj):
            bad = next(c for c in obj if _has_surrogate(c))
            return path or "(top level)", f"\\u{ord(bad):04x}"
        return None
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            r = _walk(x, f"{path}[{i}]")
            if r:
                return r
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if _has_surrogate(k):
                return (path + "." if path else "") + escape_surrogates(k) + " (a key)", \
                    f"\\u{ord(next(c for c in k if _has_surrogate(c))):04x}"
            r = _walk(v, f"{path}.{k}" if path else k)
            if r:
                return r
    return None


def dumps_record(rec: dict) -> str:
    """One output line. Records are built from validated input, so this never needs the
    fallback; it is there so that no record can crash the writer."""
    text = json.dumps(rec, ensure_ascii=False)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(sanitize(rec), ensure_ascii=False)
