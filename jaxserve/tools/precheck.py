"""The checks of a request that need the model's config and tokenizer but not its weights, for
`run_batch.py --strict`: it promises to refuse a file with any invalid line before any compute, and
a token id past the vocabulary or a prompt longer than max_model_len is only known with the model
in hand. They are the engine's own checks (`jaxserve.engine.requests`), without the KV pool (which
the engine, the authority at run time, also checks), so a line is reported the same way in both
modes."""
from __future__ import annotations

from typing import Optional


def model_errors(items, model: Optional[str], max_model_len: Optional[int]) -> dict[int, str]:
    """{index: error with its line number} for the valid items the engine would refuse. Raises
    the loaders' errors when the model's config cannot be read."""
    from jaxserve.engine.requests import Limits, to_request, validate
    from jaxserve.weights import load_config_and_tokenizer

    cfg, tok = load_config_and_tokenizer(model)
    lim = Limits(max_model_len=max_model_len or cfg.max_position_embeddings,
                 vocab_size=cfg.vocab_size, usable_pages=1 << 62, page_size=1,
                 eos_token_ids=tuple(tok.eos_token_ids) if tok is not None else cfg.eos_token_ids,
                 has_tokenizer=tok is not None)
    out = {}
    for i, it in enumerate(items):
        if it.error is not None:
            continue
        prompt = ({"messages": it.messages} if it.messages is not None else
                  {"prompt_token_ids": it.prompt_token_ids} if it.prompt_token_ids is not None
                  else {"prompt": it.prompt})
        err = validate(to_request(it.line_no, prompt, it.params, 0, tok), lim)
        if err is not None:
            out[i] = f"line {it.line_no}: {err}"
    return out
