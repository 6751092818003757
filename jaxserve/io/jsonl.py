"""JSONL batch files: one request per line in, one result per line out, same order.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [{"role", "content"}, ...]}
(or "prompt_token_ids": [...]), with optional sampling fields (see SAMPLING_FIELDS) and "priority".
A message's content is a string or a list of text parts ([{"type": "text", "text": ...}], joined
with newlines as vLLM does). Output records carry "logprobs" / "prompt_logprobs" only when the
line asked for them.

A line that cannot be used becomes an error record naming the line and the problem; it never stops
the batch. That holds for hostile lines too: every value is checked against what the engine can
honour (int32 device arrays, UTF-8 encodable strings), JSON parsing is bounded (`safe_json`), a
line longer than `max_line_bytes` is skipped without being read into memory, and invalid UTF-8 is
that line's error. Only a file that is not UTF-8 text at all (UTF-16, say) is refused as a whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Any, Iterable, Optional

from jaxserve.io.fields import check_priority, check_token_ids, normalize_messages
from jaxserve.io.openai_batch import is_openai_line, openai_record, parse_openai
from jaxserve.io.safe_json import LineError, dumps_record, find_unencodable, loads_line, sanitize
from jaxserve.sampling_params import InvalidRequest, SamplingParams

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
OTHER_FIELDS = {"id", "priority", "metadata"}
MAX_LINE_BYTES = 64 << 20   # default bound on one input line (a 64 MiB prompt is far past any model)


class InputError(ValueError):
    """The input file as a whole cannot be read (missing, not UTF-8 text); the message says why."""


@dataclasses.dataclass
class BatchItem:
    line_no: int                        # 1-based line in the input file
    id: Any
    prompt: Optional[str] = None
    messages: Optional[list] = None
    prompt_token_ids: Optional[list] = None
    params: Optional[SamplingParams] = None
    priority: int = 0
    metadata: Any = None
    error: Optional[str] = None
    fmt: str = "plain"                  # "plain" | "openai" (output in the matching format)
    url: Optional[str] = None           # OpenAI batch endpoint
    line_hash: str = ""                 # sha256 of the line's bytes: what resume compares


def _fail(line_no: int, why: str, obj: Any = None) -> BatchItem:
    """An error item; keeps the line's id (and metadata) when there is one, made writable."""
    item = BatchItem(line_no, None, error=f"line {line_no}: {why}")
    if isinstance(obj, dict):
        if is_openai_line(obj):
            item.fmt = "openai"
            item.id = sanitize(obj.get("custom_id"))
        else:
            item.id = sanitize(obj.get("id", line_no))
            item.metadata = sanitize(obj.get("metadata"))
    return item


def parse_line(line_no: int, text: str, defaults: dict) -> BatchItem:
    where = f"line {line_no}"
    try:
        obj = loads_line(text)
    except LineError as e:
        return _fail(line_no, str(e), sanitize(e.obj))
    if not isinstance(obj, dict):
        return _fail(line_no, f"expected a JSON object, got {type(obj).__name__}")
    bad = find_unencodable(obj)
    if bad is not None:
        field, char = bad
        note = ""
        if field in ("id", "custom_id"):
            note = f" (the {field} is written with it escaped as the text {char})"
        return _fail(line_no, f"field '{field}' contains a lone surrogate {char}, which is not "
                     f"valid Unicode text{note}", sanitize(obj))
    if is_openai_line(obj):
        item = BatchItem(line_no, None)
        parse_openai(item, obj, defaults)
        return item
    item = BatchItem(line_no, obj.get("id", line_no), metadata=obj.get("metadata"))
    unknown = sorted(set(obj) - SAMPLING_FIELDS - set(PROMPT_FIELDS) - OTHER_FIELDS)
    if unknown:
        item.error = f"{where}: unknown field '{unknown[0][:80]}'"
        return item
    given = [k for k in PROMPT_FIELDS if k in obj]
    if len(given) != 1:
        item.error = (f"{where}: needs exactly one of 'prompt', 'messages', 'prompt_token_ids'"
                      + (f" (got {', '.join(given)})" if given else ""))
        return item
    key = given[0]
    val = obj[key]
    err = None
    if key == "prompt" and not isinstance(val, str):
        err = "field 'prompt' must be a string"
    elif key == "messages":
        val, err = normalize_messages(val, "messages")
    elif key == "prompt_token_ids":
        err = check_token_ids(val, "prompt_token_ids")
    if err:
        item.error = f"{where}: {err}"
        return item
    setattr(item, key, val)
    prio = obj.get("priority", 0)
    err = check_priority(prio)
    if err:
        item.error = f"{where}: {err}"
        return item
    item.priority = prio
    try:
        item.params = SamplingParams(**{**defaults, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj}})
    except (InvalidRequest, TypeError) as e:
        item.error = f"{where}: {e}"
    return item


# Byte order marks of encodings that are not UTF-8 (longest first: UTF-32 LE starts like UTF-16 LE).
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
         (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"))
_UTF8_BOM = b"\xef\xbb\xbf"


def _check_encoding(path: str, head: bytes) -> int:
    """Bytes to skip at the start (a UTF-8 BOM); raises InputError for a file that is not UTF-8."""
    if head.startswith(_UTF8_BOM):
        return len(_UTF8_BOM)
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise InputError(f"{path}: the file is {name} text (it starts with the byte order mark "
                             f"{bom.hex(' ').upper()}); JSONL input must be UTF-8: convert it, e.g. "
                             f"`iconv -f {name.split()[0]} -t UTF-8 {path} > converted.jsonl`")
    # UTF-16 without a BOM: ASCII text has a NUL byte beside every character.
    sample = head[:4096]
    if len(sample) >= 4 and sample.count(0) * 4 >= len(sample):
        raise InputError(f"{path}: the file has NUL bytes in {sample.count(0)} of its first "
                         f"{len(sample)} bytes: it looks like UTF-16 or UTF-32 text, not UTF-8; "
                         "convert it to UTF-8 (e.g. with iconv)")
    return 0


def _decode(raw: bytes, errors: str):
    """(text, why or None). With errors="strict" invalid UTF-8 is the line's error, but the
    text is still decoded with replacement so the error record can carry the line's id."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", "replace")
        if errors == "replace":
            return text, None
        return text, (f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                      f"{e.start} of the line); fix the file or pass --errors=replace to replace "
                      "invalid bytes with U+FFFD")


def read_batch(path: str, defaults: Optional[dict] = None, *, max_line_bytes: int = MAX_LINE_BYTES,
               errors: str = "strict") -> list[BatchItem]:
    """Parse every non-blank line; bad lines become error items, in place. Raises InputError when
    the file is missing or is not UTF-8 text."""
    if not os.path.exists(path):
        raise InputError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"input {path} is a directory, not a JSONL file")
    defaults = defaults or {}
    items = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read the input {path}: {e.strerror}") from None
    with f:
        skip = _check_encoding(path, f.read(4096))
        f.seek(skip)
        line_no = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            line_no += 1
            if len(raw) > max_line_bytes:
                # Skip the rest of the line without holding it in memory.
                n = len(raw)
                while not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                    if not raw:
                        break
                    n += len(raw)
                items.append(BatchItem(line_no, None, error=(
                    f"line {line_no}: the line has {n} bytes, more than --max_line_bytes="
                    f"{max_line_bytes}"), line_hash=f"long:{n}"))
                continue
            if not raw.strip():
                continue
            text, why = _decode(raw, errors)
            item = parse_line(line_no, text, defaults)
            if why is not None:
                item = dataclasses.replace(_fail(line_no, why), id=item.id,
                                           metadata=item.metadata, fmt=item.fmt)
            item.line_hash = hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()
            items.append(item)
    return items


def _logprobs_json(lps):
    """Logprobs dicts (token id -> logprob) as JSON objects (ids become string keys)."""
    if lps is None:
        return None
    return [None if d is None else {str(t): v for t, v in d.items()} for d in lps]


def is_error_record(rec: dict) -> bool:
    """Whether an output record (either format) is an error."""
    if "custom_id" in rec:
        return rec.get("error") is not None
    return rec.get("finish_reason") == "error"


def check_record(item: BatchItem, rec: Any) -> Optional[str]:
    """Why `rec` cannot be this item's output record (None when it can): the resume reader's
    schema check, so that nothing of the wrong shape is copied into the output."""
    if not isinstance(rec, dict):
        return "not an object"
    if item.fmt == "openai":
        if rec.get("custom_id") != item.id or not isinstance(rec.get("id"), str):
            return "custom_id does not match the line"
        if rec.get("error") is None:
            resp = rec.get("response")
            if not (isinstance(resp, dict) and resp.get("status_code") == 200
                    and isinstance(resp.get("body"), dict)
                    and isinstance(resp["body"].get("choices"), list)):
                return "no response body"
        elif not isinstance(rec["error"], dict):
            return "malformed error"
        return None
    if rec.get("id") != item.id:
        return "id does not match the line"
    if rec.get("finish_reason") == "error":
        return None if isinstance(rec.get("error"), str) else "malformed error"
    if rec.get("finish_reason") not in ("stop", "length") or rec.get("error") is not None:
        return "bad finish_reason"
    if not isinstance(rec.get("text"), str) or not isinstance(rec.get("token_ids"), list):
        return "missing text or token_ids"
    return None


def result_record(item: BatchItem, out, model_name: str = "jaxserve",
                  token_text=None) -> dict:
    """The output line for one input line (`out` is a RequestOutput, or None for a parse error).
    `token_text(id)` names tokens in OpenAI logprobs."""
    if item.fmt == "openai":
        return openai_record(item, out, model_name, token_text)
    rec: dict[str, Any] = {"id": item.id}
    if item.metadata is not None:
        rec["metadata"] = item.metadata
    if out is None or out.finish_reason == "error":
        err = item.error or (out.error if out is not None else "unknown error")
        if out is not None and item.error is None:
            err = f"line {item.line_no}: {err}"
        rec.update(text=None, finish_reason="error", error=err)
        return rec
    rec.update(text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason, error=None,
               usage={"prompt_tokens": len(out.prompt_token_ids),
                      "completion_tokens": sum(len(x.token_ids) for x in out.samples)
                      if out.samples else len(out.token_ids)})
    # Only when asked for: one {token id: logprob} object per token (the chosen token's included;
    # prompt_logprobs starts with null for the first prompt token).
    first = out.samples[0] if out.samples else out
    if first.logprobs is not None:
        rec["logprobs"] = _logprobs_json(first.logprobs)
    if out.prompt_logprobs is not None:
        rec["prompt_logprobs"] = _logprobs_json(out.prompt_logprobs)
    if len(out.samples) > 1:
        rec["samples"] = [{"text": x.text, "token_ids": x.token_ids, "finish_reason": x.finish_reason,
                           **({"logprobs": _logprobs_json(x.logprobs)} if x.logprobs is not None
                              else {})}
                          for x in out.samples]
    return rec


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, briefly
    affecting files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write to a temporary file beside `path` and rename: a crash never leaves a torn file.
    The file gets the permissions a plain open() would (0666 less the umask): mkstemp creates
    0600, which would hide a job's results from the group that shares the folder."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".jsonl")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(dumps_record(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
