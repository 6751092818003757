"""Parsed batch lines as `LLM.generate` arguments: the prompt each line names, its sampling
parameters and priority. A line without its own seed samples from a stream derived from the engine
seed and its line number, so a resumed job, a data-parallel replica or a Ray actor samples every
line as one uninterrupted run of the whole file does."""
from __future__ import annotations

import dataclasses


def engine_prompt(it) -> dict:
    """What `LLM.generate` takes for a parsed line (errors pass through as error prompts)."""
    if it.error:
        return {"error": it.error}
    if it.messages is not None:
        return {"messages": it.messages}
    if it.prompt_token_ids is not None:
        return {"prompt_token_ids": it.prompt_token_ids}
    return {"prompt": it.prompt}


def line_seed(engine_seed: int, line_no: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([engine_seed % 2**64, line_no]).generate_state(1)[0])


def generate_args(items, defaults: dict, engine_seed: int):
    """(prompts, sampling params, priorities) of `items` for `LLM.generate`."""
    prompts, params, prios = [], [], []
    for it in items:
        prompts.append(engine_prompt(it))
        p = it.params if it.params is not None else defaults
        if it.params is not None and p.seed is None:
            p = dataclasses.replace(p, seed=line_seed(engine_seed, it.line_no))
        params.append(p)
        prios.append(it.priority)
    return prompts, params, prios
