"""Issue #2, acceptance 1: float32 logits of the JAX model against transformers (PyTorch, float32)
on tiny random checkpoints, for a ragged batch run as chunked prefill over several steps (page
boundaries crossed) and then 8 decode steps."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.cache import PagePool
from jaxserve.config import ModelConfig
from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.model_runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, Sequence
from jaxserve.weights.assemble import build_model
from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint

KINDS = ["llama3", "mistral", "qwen2", "tied"]
PAGE_SIZE = 8


def load(path):
    cfg = ModelConfig.from_json_file(f"{path}/config.json")
    ck = SafetensorsCheckpoint(path)
    return cfg, build_model(cfg, ck.get, jnp.float32, ck.where)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tiny_models):
    path, hf = tiny_models[kind]
    cfg, model = load(path)
    if kind == "llama3":
        assert len([f for f in __import__("os").listdir(path) if f.endswith(".safetensors")]) > 1
    rng = np.random.default_rng(1)
    # Ragged prompts: 1 token, exactly one page, page boundary +-1, and long ones (> sliding window).
    lens = [1, PAGE_SIZE, PAGE_SIZE + 1, 2 * PAGE_SIZE - 1, 37, 61]
    budget = 48
    pool = PagePool(num_pages=64, page_size=PAGE_SIZE)
    buckets = BucketSet.make(budget, 8, max_pages_per_seq=16, page_growth=4)
    runner = ModelRunner(model, cfg, num_pages=64, page_size=PAGE_SIZE, buckets=buckets,
                         attention_impl="reference", kv_dtype=jnp.float32)
    sched = Scheduler(pool, budget, 8)
    seqs = []
    for i, n in enumerate(lens):
        s = Sequence(index=i, prompt_ids=rng.integers(0, cfg.vocab_size, n).tolist(),
                     params=SamplingParams(max_tokens=9, temperature=0.0), seed=i,
                     stop_ids=frozenset(), max_len=512)
        seqs.append(s)
        sched.add(s)
    rows_seen = []   # (seq, position whose logits we got, logits)
    steps = 0
    prefill_steps = 0
    while sched.has_work:
        plan = sched.schedule()
        steps += 1
        prefill_steps += any(r.num_tokens > 1 for r in plan.rows)
        tokens, logits = runner.execute(plan, return_logits=True)
        for r, lg in zip(plan.rows, logits):
            rows_seen.append((r.seq, r.start + r.num_tokens - 1, lg))
        sched.commit(plan, tokens)
    assert prefill_steps >= 2, "prefill should be chunked over several steps"
    assert all(len(s.output_ids) == 9 for s in seqs)   # 1 from prefill + 8 decode steps
    # transformers on each full sequence (prompt + our greedy tokens); causality makes the logits at
    # position p depend only on tokens <= p, so one forward checks every step.
    ref = {}
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.output_ids])
        with torch.no_grad():
            ref[s.index] = hf(ids).logits[0].double().numpy()
    worst = 0.0
    for s, pos, lg in rows_seen:
        r = ref[s.index][pos]
        worst = max(worst, np.linalg.norm(lg - r) / np.linalg.norm(r))
    assert worst < 1e-4, f"{kind}: worst relative logits error {worst:.2e}"
    # Our greedy choice equals transformers' argmax at every sampled position.
    for s in seqs:
        n = len(s.prompt_ids)
        assert s.output_ids == ref[s.index][n - 1:n - 1 + 9].argmax(-1).tolist()
