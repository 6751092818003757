"""The checks of a request that need the model's config and tokenizer but not its weights, for
`--strict`: it promises to refuse a file with any invalid line before any compute, and a token id
past the vocabulary or a prompt longer than max_model_len is only known with the model in hand.

They mirror `Engine._validate` (which stays the authority at run time: it also knows the KV pool)
and produce the same messages, so a line is reported the same way in both modes.
"""
from __future__ import annotations

from typing import Optional


def tokenize(item, tok) -> list[int]:
    """The prompt's token ids, as `LLM._to_request` computes them. Raises ValueError."""
    if item.prompt_token_ids is not None:
        return list(item.prompt_token_ids)
    if tok is None:
        what = "messages" if item.messages is not None else "text prompt"
        raise ValueError(f"invalid request: {what} given but this model has no tokenizer "
                         "(pass token ids)")
    if item.messages is not None:
        return tok.encode(tok.apply_chat_template(item.messages, add_generation_prompt=True),
                          add_special_tokens=False)
    return tok.encode(item.prompt)


def request_error(item, cfg, tok, max_model_len: int) -> Optional[str]:
    """Why the engine would refuse this (parsed, valid) item, or None."""
    try:
        ids = tokenize(item, tok)
    except Exception as e:  # noqa: BLE001  (a template or tokenizer failure costs only this line)
        return str(e) if str(e).startswith("invalid request") else f"invalid request: {e}"
    if not ids:
        return "empty prompt"
    if len(ids) >= max_model_len:
        return (f"prompt of {len(ids)} tokens does not fit max_model_len={max_model_len} "
                "(needs room for at least one generated token)")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        return f"prompt token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})"
    bad = [t for t in item.params.stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        return (f"field 'stop_token_ids': token id {bad[0]} is outside the vocabulary "
                f"(size {cfg.vocab_size})")
    if item.params.stop and tok is None:
        return "field 'stop': stop strings need a tokenizer; this model has none"
    return None


def model_errors(items, model: Optional[str], max_model_len: Optional[int]) -> dict[int, str]:
    """{index: error with its line number} for the valid items the engine would refuse. Raises
    the loaders' errors when the model's config cannot be read."""
    from jaxserve.weights import load_config_and_tokenizer

    cfg, tok = load_config_and_tokenizer(model)
    limit = max_model_len or cfg.max_position_embeddings
    out = {}
    for i, it in enumerate(items):
        if it.error is None:
            err = request_error(it, cfg, tok, limit)
            if err is not None:
                out[i] = f"line {it.line_no}: {err}"
    return out
