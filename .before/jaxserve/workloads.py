"""Deterministic synthetic workloads with token-level control of lengths (DESIGN.md §6 families).

Each request is a dict in run_batch's JSONL format: {"id", "prompt_token_ids", "max_tokens",
"ignore_eos": true}. Token ids are random over the vocabulary (ids below `reserved` are avoided, so
no prompt contains special tokens); shared parts are the same ids, so the prefix tree sees them.
"""
from __future__ import annotations

import numpy as np

# Named workloads (the ones benchmarks record). Counts scale with `scale`.
PRESETS = {
    "nosharing": dict(family="nosharing", num_requests=1024, input_len=512, output_len=256),
    "batchllm": dict(family="groups", num_groups=400, share=16, shared_len=2000, unique_len=200,
                     output_len=100),
    "document": dict(family="document", num_docs=32, questions=64, doc_len=4096, question_len=64,
                     output_len=64),
    "system": dict(family="system", num_requests=1024, system_len=1024, unique_len=256,
                   output_len=128),
    "mixed": dict(family="mixed", num_requests=1024, short_in=64, long_out=512, long_in=2048,
                  short_out=16),
}


def _ids(rng, n, vocab, reserved):
    return rng.integers(reserved, vocab, n).tolist()


def _req(i, ids, out):
    return {"id": f"req-{i:06d}", "prompt_token_ids": ids, "max_tokens": int(out), "ignore_eos": True}


def generate(family: str, *, vocab_size: int, seed: int = 0, reserved: int = 256, **kw) -> list[dict]:
    rng = np.random.default_rng(seed)
    reserved = min(reserved, vocab_size // 4)   # tiny test vocabularies
    out = []
    if family == "nosharing":
        # Each prompt starts with a distinct token pair: no prefix is shared, not even by chance.
        for i in range(kw["num_requests"]):
            head = [reserved + i % (vocab_size - reserved), reserved + i // (vocab_size - reserved)]
            out.append(_req(i, head + _ids(rng, kw["input_len"] - 2, vocab_size, reserved),
                            kw["output_len"]))
    elif family in ("groups", "document"):
        # A long document shared by many questions is a group whose shared part is the document.
        if family == "document":
            kw = dict(num_groups=kw["num_docs"], share=kw["questions"], shared_len=kw["doc_len"],
                      unique_len=kw["question_len"], output_len=kw["output_len"])
        i = 0
        for _ in range(kw["num_groups"]):
            shared = _ids(rng, kw["shared_len"], vocab_size, reserved)
            for _ in range(kw["share"]):
                out.append(_req(i, shared + _ids(rng, kw["unique_len"], vocab_size, reserved),
                                kw["output_len"]))
                i += 1
    elif family == "system":
        system = _ids(rng, kw["system_len"], vocab_size, reserved)
        for i in range(kw["num_requests"]):
            out.append(_req(i, system + _ids(rng, kw["unique_len"], vocab_size, reserved),
                            kw["output_len"]))
    elif family == "mixed":
        # Half compute-heavy (long prompt, short output), half memory-heavy (short prompt, long
        # output), interleaved in input order.
        for i in range(kw["num_requests"]):
            if i % 2:
                out.append(_req(i, _ids(rng, kw["long_in"], vocab_size, reserved), kw["short_out"]))
            else:
                out.append(_req(i, _ids(rng, kw["short_in"], vocab_size, reserved), kw["long_out"]))
    else:
        raise ValueError(f"unknown workload family {family!r}")
    return out


def preset(name: str, *, vocab_size: int, scale: float = 1.0, seed: int = 0) -> list[dict]:
    """A named workload; `scale` shrinks the number of requests/groups with the same ratios."""
    if name not in PRESETS:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(PRESETS)})")
    kw = dict(PRESETS[name])
    for k in ("num_requests", "num_groups", "num_docs"):
        if k in kw:
            kw[k] = max(1, int(round(kw[k] * scale)))
    return generate(kw.pop("family"), vocab_size=vocab_size, seed=seed, **kw)
