"""Issue #7: presence / frequency / repetition penalties against a numpy reference, on the sampler
function (random logits and histories) and end to end (greedy decoding driven by transformers'
float32 logits with the reference penalties applied at every step)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.engine import Request
from jaxserve.runner.extras import ExtrasContext, _History
from jaxserve.runner.sampler import apply_penalties, history_to_dense, penalize
from jaxserve.sampling_params import InvalidRequest, SamplingParams
from tests.test_engine import hf_greedy, make_engine


def numpy_penalties(logits, prompt_ids, output_ids, presence, frequency, repetition):
    """vLLM's apply_penalties for one row, from the raw token lists: repetition over prompt +
    generated tokens, then frequency * count and presence * (count > 0) over generated ones."""
    x = np.array(logits, np.float64)
    counts = np.bincount(np.asarray(output_ids, np.int64), minlength=len(x))[:len(x)]
    seen = counts > 0
    seen[list(prompt_ids)] = True
    r = np.where(seen, repetition, 1.0)
    x = np.where(x > 0, x / r, x * r)
    return x - frequency * counts - presence * (counts > 0)


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(0)
    S, V = 12, 300
    logits = rng.normal(0, 3, (S, V)).astype(np.float32)
    prompts, outputs, params = [], [], []
    for s in range(S):
        prompts.append(rng.integers(0, V, int(rng.integers(1, 60))).tolist())
        # Few distinct ids so that counts > 1 are common.
        outputs.append(rng.integers(0, 40, int(rng.integers(0, 50))).tolist())
        if s % 3 == 0:     # rows without penalties in the same batch
            params.append(SamplingParams())
        else:
            params.append(SamplingParams(presence_penalty=float(rng.uniform(-2, 2)),
                                         frequency_penalty=float(rng.uniform(-2, 2)),
                                         repetition_penalty=float(rng.uniform(0.3, 3)) if s % 2 else 1.0))
    width = 128
    hist_ids = np.full((S, width), -1, np.int32)
    hist_counts = np.zeros((S, width), np.int32)
    for s in range(S):
        if params[s].has_penalties:
            h = _History(prompts[s], params[s].repetition_penalty != 1.0, width)
            # Two syncs: the host's history grows step by step.
            h.sync(outputs[s][:len(outputs[s]) // 2])
            h.sync(outputs[s])
            hist_ids[s], hist_counts[s] = h.ids, h.counts
    pres = np.array([p.presence_penalty for p in params], np.float32)
    freq = np.array([p.frequency_penalty for p in params], np.float32)
    rep = np.array([p.repetition_penalty for p in params], np.float32)
    got = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(hist_ids), jnp.asarray(hist_counts),
                              jnp.asarray(pres), jnp.asarray(freq), jnp.asarray(rep)))
    for s in range(S):
        p = params[s]
        want = numpy_penalties(logits[s], prompts[s] if p.repetition_penalty != 1.0 else [],
                               outputs[s], p.presence_penalty, p.frequency_penalty,
                               p.repetition_penalty)
        np.testing.assert_allclose(got[s], want, rtol=1e-6, atol=1e-5, err_msg=f"row {s}")
        if not p.has_penalties:
            assert (got[s] == logits[s]).all()   # bit-identical
    # The dense form gives the same, and -inf (banned) logits stay -inf.
    logits[1, :5] = -np.inf
    counts, seen = history_to_dense(jnp.asarray(hist_ids), jnp.asarray(hist_counts), V)
    dense = np.asarray(apply_penalties(jnp.asarray(logits), counts, seen, jnp.asarray(pres),
                                       jnp.asarray(freq), jnp.asarray(rep)))
    np.testing.assert_allclose(dense[2:], got[2:], rtol=1e-6, atol=1e-6)
    assert np.isneginf(dense[1, :5]).all()
    # No row with a penalty: the lax.cond skips the work and returns the logits unchanged.
    none = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(hist_ids), jnp.asarray(hist_counts),
                               jnp.zeros(S), jnp.zeros(S), jnp.ones(S)))
    assert np.array_equal(none, logits)


def test_history_width_covers_the_batch():
    """The run's history width holds every penalised request's distinct tokens."""
    from jaxserve.scheduler import Sequence

    seqs = [Sequence(index=0, prompt_ids=[1, 2, 2, 3] * 10, params=SamplingParams(max_tokens=30)),
            Sequence(index=1, prompt_ids=list(range(50)),
                     params=SamplingParams(max_tokens=20, repetition_penalty=1.2)),
            Sequence(index=2, prompt_ids=list(range(500)),
                     params=SamplingParams(max_tokens=20, frequency_penalty=0.5))]
    ctx = ExtrasContext.for_batch(seqs, vocab_size=384)
    assert ctx.spec.hist_width == 128 and not ctx.spec.logprobs and not ctx.spec.prompt_logprobs
    assert ExtrasContext.for_batch(seqs[:1], 384) is None    # nothing asked: plain programs only


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("repetition_penalty", 0), ("repetition_penalty", "x"),
                                         ("presence_penalty", float("nan")),
                                         ("logprobs", 21), ("logprobs", -1), ("logprobs", True),
                                         ("prompt_logprobs", 50), ("prompt_logprobs", 1.5)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(InvalidRequest, match=f"field '{field}'"):
        SamplingParams(**{field: value})


def reference_greedy(hf, prompt, params, n):
    """Greedy decoding where each step takes transformers' float32 logits for prompt + generated
    so far, applies the numpy penalties and takes the argmax."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            lg = hf(torch.tensor([prompt + out])).logits[0, -1].double().numpy()
        x = numpy_penalties(lg, prompt if params.repetition_penalty != 1.0 else [], out,
                            params.presence_penalty, params.frequency_penalty,
                            params.repetition_penalty)
        out.append(int(np.argmax(x)))
    return out


def test_penalized_greedy_equals_reference_decode(tiny_models):
    path, hf = tiny_models["llama3"]
    eng = make_engine(path, page_bucket_growth=1)
    rng = np.random.default_rng(3)
    n_out = 12
    pen = [SamplingParams(max_tokens=n_out, temperature=0, frequency_penalty=1.5),
           SamplingParams(max_tokens=n_out, temperature=0, presence_penalty=2.0),
           SamplingParams(max_tokens=n_out, temperature=0, repetition_penalty=1.8),
           SamplingParams(max_tokens=n_out, temperature=0, repetition_penalty=1.3,
                          frequency_penalty=0.7, presence_penalty=-0.5)]
    prompts = [rng.integers(0, 384, n).tolist() for n in (5, 23, 41, 12)]
    plain = [Request(f"plain{i}", rng.integers(0, 384, n).tolist(),
                     SamplingParams(max_tokens=n_out, temperature=0)) for i, n in enumerate((9, 30))]
    reqs = [Request(f"pen{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, pen))]
    batch = reqs[:2] + plain[:1] + reqs[2:] + plain[1:]
    outs = {o.request_id: o for o in eng.run(batch)}
    n_differ = 0
    for r in reqs:
        want = reference_greedy(hf, r.prompt_ids, r.params, n_out)
        assert outs[r.request_id].token_ids == want, r.request_id
        n_differ += want != hf_greedy(hf, Request("x", r.prompt_ids, SamplingParams(
            max_tokens=n_out, temperature=0)))
    assert n_differ >= 3, "strong penalties should change most greedy outputs"
    # Rows without penalties in the same steps are unchanged.
    for r in plain:
        assert outs[r.request_id].token_ids == hf_greedy(hf, r), r.request_id
        assert outs[r.request_id].logprobs is None
