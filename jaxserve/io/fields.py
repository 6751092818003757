"""Checks of request fields shared by the plain and the OpenAI batch formats. Each returns an
error naming the field (or None), so a bad value costs only its line."""
from __future__ import annotations

from typing import Optional

from jaxserve.sampling_params import INT32_MAX, SEED_MAX, SEED_MIN


def normalize_messages(val, field: str):
    """(messages with string contents, None) or (None, error naming the field). Content parts of
    type "text" are joined with newlines (vLLM's string content format); other types are refused
    since this engine has no image or audio input."""
    if not (isinstance(val, list) and val):
        return None, f"field '{field}' must be a non-empty list of {{role, content}} messages"
    out = []
    for i, m in enumerate(val):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            return None, f"field '{where}' must be an object with 'role' and 'content'"
        if not isinstance(m.get("role"), str):
            return None, f"field '{where}.role' must be a string"
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    return None, f"field '{pw}' must be a content part object"
                ptype = part.get("type")
                if ptype != "text":
                    shown = ptype if isinstance(ptype, str) else repr(ptype)[:40]
                    return None, (f"field '{pw}.type': content parts of type '{shown}' are not "
                                  "supported (only 'text')")
                if not isinstance(part.get("text"), str):
                    return None, f"field '{pw}.text' must be a string"
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            return None, f"field '{where}.content' must be a string or a list of text parts"
        out.append({**m, "content": content})
    return out, None


def check_token_ids(val, field: str) -> Optional[str]:
    """An error naming the field, or None. Ids must fit the int32 arrays they are copied into;
    the vocabulary bound is the engine's (it knows the model)."""
    if not isinstance(val, list):
        return f"field '{field}' must be a list of integers"
    for i, t in enumerate(val):
        if isinstance(t, bool) or not isinstance(t, int):
            return f"field '{field}' must be a list of integers (element {i} is not)"
        if not 0 <= t <= INT32_MAX:
            return (f"field '{field}[{i}]': token id {t} is outside [0, {INT32_MAX}] "
                    "(it cannot be in any vocabulary)")
    return None


def check_priority(prio, field: str = "priority") -> Optional[str]:
    if isinstance(prio, bool) or not isinstance(prio, int):
        return f"field '{field}' must be an integer"
    if not SEED_MIN <= prio <= SEED_MAX:
        return f"field '{field}' must fit in 64 bits"
    return None
