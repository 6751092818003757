"""OpenAI Batch API files: input lines {"custom_id", "method", "url", "body"} for
/v1/completions and /v1/chat/completions, output lines {"id", "custom_id", "response": {
"status_code", "request_id", "body": {... "choices", "usage"}}, "error"}.

Fields we cannot honour yet are refused per line with a message naming them, never ignored.

Log-probabilities and penalties follow OpenAI's fields: /v1/chat/completions takes `logprobs`
(bool) and `top_logprobs` (0..20, needs `logprobs`), /v1/completions takes `logprobs` (an int: how
many top logprobs, 0..20); both take `presence_penalty` and `frequency_penalty` ([-2, 2]) and, as a
vLLM-style extension, `repetition_penalty` (> 0, 1 = off). Logprobs are of the model's raw
distribution (before penalties, temperature and top-p; vLLM's default) and come back in OpenAI's
shape: chat `choices[i].logprobs.content = [{token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}]}]`; completions `choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token:
logprob}], text_offset}`, with offsets counted from the start of the returned text. Token strings
are each token decoded on its own (as vLLM does), `bytes` their UTF-8 bytes.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Optional

from jaxserve.sampling_params import MAX_LOGPROBS, InvalidRequest, SamplingParams

URLS = ("/v1/completions", "/v1/chat/completions")
# Body fields we honour; `model` names the served model and is not checked (one model per job).
_BODY_FIELDS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
                "top_p", "n", "stop", "seed", "user", "logprobs", "top_logprobs", "stream",
                "presence_penalty", "frequency_penalty", "repetition_penalty"}


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
    kw = dict(defaults)
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if url == "/v1/chat/completions":
        if lp is not None and not isinstance(lp, bool):
            return refuse("logprobs", "must be a boolean (the number goes in 'top_logprobs')")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
                return refuse("top_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
            if not lp:
                return refuse("top_logprobs", "needs 'logprobs': true")
        if lp:
            kw["logprobs"] = top or 0
    else:
        if top is not None:
            return refuse("top_logprobs", "is a /v1/chat/completions field; /v1/completions "
                          "takes the number of top logprobs in 'logprobs'")
        if lp is not None:
            kw["logprobs"] = lp
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        kw["max_tokens"] = mt
    for f in ("temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty",
              "repetition_penalty"):
        if body.get(f) is not None:
            kw[f] = body[f]
    try:
        item.params = SamplingParams(**kw)
    except InvalidRequest as e:
        # SamplingParams names its fields; in this format they live under "body".
        item.error = f"{where}: {str(e).replace('field ' + chr(39), 'field ' + chr(39) + 'body.')}"


def _token_entry(text: str, lp: float) -> dict[str, Any]:
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def _logprobs_block(smp, k: int, chat: bool, token_text: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's logprobs object of one choice from SampleOutput.logprobs."""
    steps = []
    for tok, d in zip(smp.token_ids, smp.logprobs):
        top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        steps.append((tok, d[tok], top))
    if chat:
        return {"content": [{**_token_entry(token_text(tok), lp),
                             "top_logprobs": [_token_entry(token_text(t), v) for t, v in top]}
                            for tok, lp, top in steps], "refusal": None}
    tokens = [token_text(tok) for tok, _, _ in steps]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in steps],
            "top_logprobs": [{token_text(t): v for t, v in top} for _, _, top in steps],
            "text_offset": offsets}


def openai_record(item, out, model_name: str,
                  token_text: Optional[Callable[[int], str]] = None) -> dict[str, Any]:
    """`token_text(id)` names a token in logprobs (default: the id as a string)."""
    rid = f"batch_req_{uuid.uuid4().hex[:24]}"
    if out is None or out.finish_reason == "error":
        err = item.error or f"line {item.line_no}: {out.error if out is not None else 'unknown error'}"
        return {"id": rid, "custom_id": item.id, "response": None,
                "error": {"code": "invalid_request", "message": err}}
    chat = item.url == "/v1/chat/completions"
    choices = []
    for k, smp in enumerate(out.samples or [out]):
        choice: dict[str, Any] = {"index": k, "finish_reason": smp.finish_reason, "logprobs": None}
        if getattr(smp, "logprobs", None) is not None and item.params is not None:
            choice["logprobs"] = _logprobs_block(smp, item.params.logprobs, chat, token_text or str)
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
