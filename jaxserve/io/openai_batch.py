"""OpenAI Batch API files: input lines {"custom_id", "method", "url", "body"} for
/v1/completions and /v1/chat/completions, output lines {"id", "custom_id", "response": {
"status_code", "request_id", "body": {... "choices", "usage"}}, "error"}.

Fields we cannot honour yet are refused per line with a message naming them, never ignored.
Besides OpenAI's fields, bodies take the sampling extras of vLLM's run-batch that the engine
implements (top_k, min_p, min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output,
repetition_penalty, prompt_logprobs, priority); vLLM extras it does not implement (beam search,
echo, ...) are accepted only at their "off" value. Chat messages take text content parts.

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

import json
import time
import uuid
from typing import Any, Callable, Optional

from jaxserve.io.fields import check_priority, check_token_ids, normalize_messages
from jaxserve.sampling_params import MAX_LOGPROBS, InvalidRequest, SamplingParams

URLS = ("/v1/completions", "/v1/chat/completions")
# Body fields we honour; `model` names the served model and is not checked (one model per job).
# Besides OpenAI's own, the sampling extras vLLM's run-batch accepts (vLLM's protocol.py
# "sampling params" of ChatCompletionRequest / CompletionRequest) that this engine implements,
# and vLLM's `priority`.
_BODY_FIELDS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
                "top_p", "n", "stop", "seed", "user", "logprobs", "top_logprobs", "stream",
                "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
                "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
                "prompt_logprobs", "priority"}
_PASSED_THROUGH = ("temperature", "top_p", "seed", "stop", "n", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "top_k", "min_p", "stop_token_ids",
                   "include_stop_str_in_output", "ignore_eos", "min_tokens", "prompt_logprobs")
# vLLM extras this engine does not implement, accepted at the value that means "off" (clients
# send them with their defaults) and refused, naming them, at any other value.
_NOOP_DEFAULTS = {"use_beam_search": False, "length_penalty": 1.0, "skip_special_tokens": True,
                  "spaces_between_special_tokens": True, "echo": False,
                  "truncate_prompt_tokens": None, "continue_final_message": False}
_NOOP_PER_URL = {"/v1/chat/completions": {"add_generation_prompt": True, "add_special_tokens": False},
                 "/v1/completions": {"add_special_tokens": True}}


def is_openai_line(obj: dict) -> bool:
    return "custom_id" in obj or ("body" in obj and "url" in obj)


def parse_openai(item, obj: dict, defaults: dict) -> None:
    """Fill a BatchItem from an OpenAI batch line (sets `item.error` on a bad line)."""
    where = f"line {item.line_no}"
    item.fmt = "openai"
    item.id = obj.get("custom_id")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        item.error = f"{where}: unknown field '{unknown[0][:80]}'"
        return
    if not isinstance(item.id, str) or not item.id:
        item.error = f"{where}: field 'custom_id' must be a non-empty string"
        return
    if obj.get("method", "POST") != "POST":
        item.error = f"{where}: field 'method' must be POST"
        return
    url = obj.get("url")
    if url not in URLS:
        shown = repr(url) if len(repr(url)) <= 80 else repr(url)[:77] + "..."
        item.error = f"{where}: field 'url'={shown} is not one of {', '.join(URLS)}"
        return
    item.url = url
    body = obj.get("body")
    if not isinstance(body, dict):
        item.error = f"{where}: field 'body' must be an object"
        return
    noop = {**_NOOP_DEFAULTS, **_NOOP_PER_URL[url]}
    unknown = sorted(set(body) - _BODY_FIELDS - set(noop) - {"best_of"})
    if unknown:
        item.error = f"{where}: unknown field 'body.{unknown[0][:80]}'"
        return

    def refuse(field, why):
        item.error = f"{where}: field 'body.{field}': {why}"

    for f, off in noop.items():
        if f in body and body[f] != off:
            return refuse(f, f"is not supported (only {json.dumps(off)}, which is the default)")
    if body.get("best_of") is not None and body["best_of"] != body.get("n", 1):
        return refuse("best_of", "is not supported (only best_of equal to n)")

    if url == "/v1/chat/completions":
        msgs, err = normalize_messages(body.get("messages"), "body.messages")
        if err:
            item.error = f"{where}: {err}"
            return
        item.messages = msgs
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            item.prompt = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            err = check_token_ids(prompt, "body.prompt")
            if err:
                item.error = f"{where}: {err}"
                return
            item.prompt_token_ids = prompt
        else:
            return refuse("prompt", "must be a string or a list of token ids")
    if body.get("stream", False):
        return refuse("stream", "streaming does not apply to batch files")
    err = check_priority(body.get("priority", 0), "body.priority")
    if err:
        item.error = f"{where}: {err}"
        return
    item.priority = body.get("priority", 0)
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
    for f in _PASSED_THROUGH:
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
