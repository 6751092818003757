"""JSONL batch files: one request per line in, one result per line out, same order.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [{"role", "content"}, ...]}
(or "prompt_token_ids": [...]), with optional sampling fields (see SAMPLING_FIELDS) and "priority".
Output records carry "logprobs" / "prompt_logprobs" only when the line asked for them.
A line that cannot be used becomes an error record naming the line and the problem; it never stops
the batch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterable, Optional

from jaxserve.io.openai_batch import is_openai_line, openai_record, parse_openai
from jaxserve.sampling_params import InvalidRequest, SamplingParams

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
OTHER_FIELDS = {"id", "priority", "metadata"}


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


def parse_line(line_no: int, text: str, defaults: dict) -> BatchItem:
    where = f"line {line_no}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchItem(line_no, None, error=f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return BatchItem(line_no, None, error=f"{where}: expected a JSON object, got {type(obj).__name__}")
    if is_openai_line(obj):
        item = BatchItem(line_no, None)
        parse_openai(item, obj, defaults)
        return item
    item = BatchItem(line_no, obj.get("id", line_no), metadata=obj.get("metadata"))
    unknown = sorted(set(obj) - SAMPLING_FIELDS - set(PROMPT_FIELDS) - OTHER_FIELDS)
    if unknown:
        item.error = f"{where}: unknown field '{unknown[0]}'"
        return item
    given = [k for k in PROMPT_FIELDS if k in obj]
    if len(given) != 1:
        item.error = (f"{where}: needs exactly one of 'prompt', 'messages', 'prompt_token_ids'"
                      + (f" (got {', '.join(given)})" if given else ""))
        return item
    key = given[0]
    val = obj[key]
    if key == "prompt" and not isinstance(val, str):
        item.error = f"{where}: field 'prompt' must be a string"
    elif key == "messages" and not (isinstance(val, list) and val and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in val)):
        item.error = f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings"
    elif key == "prompt_token_ids" and not (isinstance(val, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in val)):
        item.error = f"{where}: field 'prompt_token_ids' must be a list of integers"
    if item.error:
        return item
    setattr(item, key, val)
    prio = obj.get("priority", 0)
    if isinstance(prio, bool) or not isinstance(prio, int):
        item.error = f"{where}: field 'priority' must be an integer"
        return item
    item.priority = prio
    try:
        item.params = SamplingParams(**{**defaults, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj}})
    except InvalidRequest as e:
        item.error = f"{where}: {e}"
    except TypeError as e:
        item.error = f"{where}: {e}"
    return item


def read_batch(path: str, defaults: Optional[dict] = None) -> list[BatchItem]:
    """Parse every non-blank line; bad lines become error items, in place."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file not found: {path}")
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                items.append(parse_line(i, line, defaults or {}))
    return items


def _logprobs_json(lps):
    """Logprobs dicts (token id -> logprob) as JSON objects (ids become string keys)."""
    if lps is None:
        return None
    return [None if d is None else {str(t): v for t, v in d.items()} for d in lps]


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


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write to a temporary file beside `path` and rename: a crash never leaves a torn file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
