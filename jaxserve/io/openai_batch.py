"""OpenAI Batch API files: input lines {"custom_id", "method", "url", "body"} for
/v1/completions and /v1/chat/completions, output lines {"id", "custom_id", "response": {
"status_code", "request_id", "body": {... "choices", "usage"}}, "error"}.

Fields we cannot honour yet are refused per line with a message naming them, never ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from jaxserve.sampling_params import InvalidRequest, SamplingParams

URLS = ("/v1/completions", "/v1/chat/completions")
# Body fields we honour; `model` names the served model and is not checked (one model per job).
_BODY_FIELDS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
                "top_p", "n", "stop", "seed", "user", "logprobs", "top_logprobs", "stream",
                "presence_penalty", "frequency_penalty"}


def is_openai_line(obj: dict) -> bool:
    return "custom_id" in obj or ("body" in obj and "url" in obj)


def parse_openai(item, obj: dict, defaults: dict) -> None:
    """Fill a BatchItem from an OpenAI batch line (sets `item.error` on a bad line)."""
    where = f"line {item.line_no}"
    item.fmt = "openai"
    item.id = obj.get("custom_id")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        item.error = f"{where}: unknown field '{unknown[0]}'"
        return
    if not isinstance(item.id, str) or not item.id:
        item.error = f"{where}: field 'custom_id' must be a non-empty string"
        return
    if obj.get("method", "POST") != "POST":
        item.error = f"{where}: field 'method' must be POST"
        return
    url = obj.get("url")
    if url not in URLS:
        item.error = f"{where}: field 'url'={url!r} is not one of {', '.join(URLS)}"
        return
    item.url = url
    body = obj.get("body")
    if not isinstance(body, dict):
        item.error = f"{where}: field 'body' must be an object"
        return
    unknown = sorted(set(body) - _BODY_FIELDS)
    if unknown:
        item.error = f"{where}: unknown field 'body.{unknown[0]}'"
        return

    def refuse(field, why):
        item.error = f"{where}: field 'body.{field}': {why}"

    if url == "/v1/chat/completions":
        msgs = body.get("messages")
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            return refuse("messages", "must be a non-empty list of {role, content} strings")
        item.messages = msgs
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            item.prompt = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            item.prompt_token_ids = prompt
        else:
            return refuse("prompt", "must be a string or a list of token ids")
    if body.get("stream", False):
        return refuse("stream", "streaming does not apply to batch files")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        return refuse("logprobs", "log-probabilities are not supported yet")
    for f in ("presence_penalty", "frequency_penalty"):
        if body.get(f, 0) not in (0, 0.0):
            return refuse(f, "penalties are not supported yet")
    kw = dict(defaults)
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        kw["max_tokens"] = mt
    for f in ("temperature", "top_p", "seed", "stop", "n"):
        if body.get(f) is not None:
            kw[f] = body[f]
    try:
        item.params = SamplingParams(**kw)
    except InvalidRequest as e:
        # SamplingParams names its fields; in this format they live under "body".
        item.error = f"{where}: {str(e).replace('field ' + chr(39), 'field ' + chr(39) + 'body.')}"


def openai_record(item, out, model_name: str) -> dict[str, Any]:
    rid = f"batch_req_{uuid.uuid4().hex[:24]}"
    if out is None or out.finish_reason == "error":
        err = item.error or f"line {item.line_no}: {out.error if out is not None else 'unknown error'}"
        return {"id": rid, "custom_id": item.id, "response": None,
                "error": {"code": "invalid_request", "message": err}}
    chat = item.url == "/v1/chat/completions"
    choices = []
    for k, smp in enumerate(out.samples or [out]):
        choice: dict[str, Any] = {"index": k, "finish_reason": smp.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": smp.text}
        else:
            choice["text"] = smp.text
        choices.append(choice)
    n_in = len(out.prompt_token_ids)
    n_out = sum(len(smp.token_ids) for smp in (out.samples or [out]))
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                      "total_tokens": n_in + n_out}}
    return {"id": rid, "custom_id": item.id,
            "response": {"status_code": 200, "request_id": body["id"], "body": body}, "error": None}
