"""Mixed-density workloads after BlendServe's evaluation: request kinds of very different compute
density in one batch, with prefixes shared inside each kind, in a clustered or interleaved order.

Kinds (token lengths drawn per request; log-normal where a real trace's lengths are):
  chat       ShareGPT-like conversation turns: one of 8 system prompts of 256 tokens, a user turn
             of ~128 tokens (log-normal, 16..1024) and a reply of ~96 (16..1024).
  summarize  long-document summarisation / QA: a document of 512-2048 tokens asked 2 questions
             (16..48 tokens), each answered briefly (16..128): compute-heavy (prefill).
  generate   generation-heavy: one of 16 few-shot templates of 96 tokens, a short request (16..64)
             and a long completion (128..384): memory-heavy (decode: rows and KV for many steps).
Each request is a run_batch JSONL dict with a fixed output length ({"max_tokens": n,
"ignore_eos": true}) so every engine and policy does the same work.

Order: "clustered" puts each kind's requests together (the kinds in `kinds` order, as
concatenated datasets arrive), "interleaved" shuffles them (seeded).

BlendServe's paper mixes text and multimodal requests of such opposite densities with shared
prefixes and measures the throughput of orderings; its exact traces and ratios are not reproduced
here (this module draws synthetic lengths of the three kinds above).
"""
from __future__ import annotations

import numpy as np

FAMILY = "blend_mix"
KINDS = ("generate", "chat", "summarize")


def _lognormal(rng, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = np.log(mean) - sigma * sigma / 2
    return int(np.clip(round(rng.lognormal(mu, sigma)), lo, hi))


def _ids(rng, n, vocab, reserved):
    return rng.integers(reserved, vocab, n).tolist()


def _kind_requests(kind: str, n: int, rng, vocab: int, reserved: int, kw: dict) -> list:
    """`n` requests of one kind as (prompt ids, output length)."""
    out = []
    if kind == "chat":
        systems = [_ids(rng, kw["system_len"], vocab, reserved) for _ in range(kw["chat_systems"])]
        for i in range(n):
            user = _lognormal(rng, kw["chat_in"], 0.7, 16, 1024)
            out.append((systems[i % len(systems)] + _ids(rng, user, vocab, reserved),
                        _lognormal(rng, kw["chat_out"], 0.6, 16, 1024)))
    elif kind == "summarize":
        while len(out) < n:
            doc = _ids(rng, int(rng.integers(kw["doc_min"], kw["doc_max"] + 1)), vocab, reserved)
            for _ in range(min(kw["questions"], n - len(out))):
                q = _ids(rng, int(rng.integers(16, 49)), vocab, reserved)
                out.append((doc + q, int(rng.integers(16, 129))))
    elif kind == "generate":
        templates = [_ids(rng, 96, vocab, reserved) for _ in range(kw["templates"])]
        for i in range(n):
            ask = _ids(rng, int(rng.integers(16, 65)), vocab, reserved)
            out.append((templates[i % len(templates)] + ask,
                        int(rng.integers(kw["gen_min"], kw["gen_max"] + 1))))
    else:
        raise ValueError(f"unknown request kind {kind!r} (known: {', '.join(KINDS)})")
    return out


DEFAULTS = dict(system_len=256, chat_systems=8, chat_in=128, chat_out=96, doc_min=512,
                doc_max=2048, questions=2, templates=16, gen_min=128, gen_max=384)


def generate(*, vocab_size: int, seed: int = 0, reserved: int = 256, num_requests: int,
             shares: dict, order: str = "clustered", kinds=KINDS, **kw) -> list[dict]:
    """`num_requests` requests split over `kinds` by `shares` (fractions), in `order`."""
    if order not in ("clustered", "interleaved"):
        raise ValueError(f"order={order!r} must be clustered or interleaved")
    rng = np.random.default_rng(seed)
    reserved = min(reserved, vocab_size // 4)
    kw = {**DEFAULTS, **kw}
    total = sum(shares.get(k, 0) for k in kinds)
    counts = [int(round(num_requests * shares.get(k, 0) / total)) for k in kinds]
    counts[-1] += num_requests - sum(counts)
    reqs = []
    for kind, n in zip(kinds, counts):
        reqs += [(kind, p, d) for p, d in _kind_requests(kind, n, rng, vocab_size, reserved, kw)]
    if order == "interleaved":
        reqs = [reqs[i] for i in rng.permutation(len(reqs))]
    return [{"id": f"req-{i:06d}-{kind}", "prompt_token_ids": p, "max_tokens": d,
             "ignore_eos": True} for i, (kind, p, d) in enumerate(reqs)]


def kind_of(request: dict) -> str:
    """The kind a request of this module was drawn as (from its id)."""
    return request["id"].rsplit("-", 1)[1]


# Presets of 3,000 requests: 45-65 s projected on one H200 with Llama-3-8B (bf16) at
# --max_num_seqs=1024 (`engine/simulate.py`; 55-75 s at the default 256 rows).
_MIXES = {
    "gen_summarize": dict(shares={"generate": 0.5, "summarize": 0.5}),
    "chat_summarize": dict(shares={"chat": 0.5, "summarize": 0.5}),
    "mix3": dict(shares={"generate": 0.3, "chat": 0.4, "summarize": 0.3}),
}
PRESETS = {f"blend_{name}_{order}": dict(family=FAMILY, num_requests=3000, order=order, **mix)
           for name, mix in _MIXES.items() for order in ("clustered", "interleaved")}
