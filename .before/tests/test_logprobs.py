"""Issue #7: logprobs and prompt_logprobs equal transformers' float32 log-softmax on the tiny models
(within 1e-4, same top-k ids): ragged prompts chunked over several steps, n = 2 sampled at
temperature > 0, a workload sharing a long prefix, and fused decode blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxserve.engine import Request
from jaxserve.sampling_params import SamplingParams
from tests.test_engine import hf_greedy, make_engine

TOL = 1e-4


def hf_logprobs(hf, ids):
    """log_softmax of transformers' float32 logits at every position of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).double().numpy()


def check_entry(d, chosen, ref, k):
    """One token's dict: the top-k ids in order, their values and the chosen token's value."""
    top = np.argsort(-ref)[:k]
    assert list(d)[:k] == top.tolist(), (list(d)[:k], top.tolist())
    assert len(d) == k + (chosen not in top)
    for t, v in d.items():
        assert abs(v - ref[t]) < TOL, (t, v, ref[t])
    assert chosen in d


def check_output(hf, req, out):
    p = req.params
    for smp in out.samples:
        ids = req.prompt_ids + smp.token_ids
        lp = hf_logprobs(hf, ids)
        n = len(req.prompt_ids)
        if p.logprobs is None:
            assert smp.logprobs is None
        else:
            assert len(smp.logprobs) == len(smp.token_ids)
            for i, (tok, d) in enumerate(zip(smp.token_ids, smp.logprobs)):
                check_entry(d, tok, lp[n - 1 + i], p.logprobs)
                if p.temperature == 0 and not p.has_penalties:
                    assert tok == list(d)[0]
    if p.prompt_logprobs is None:
        assert out.prompt_logprobs is None
    else:
        lp = hf_logprobs(hf, req.prompt_ids)
        assert len(out.prompt_logprobs) == len(req.prompt_ids) and out.prompt_logprobs[0] is None
        for j in range(1, len(req.prompt_ids)):
            check_entry(out.prompt_logprobs[j], req.prompt_ids[j], lp[j - 1], p.prompt_logprobs)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_logprobs_match_transformers(kind, tiny_models):
    path, hf = tiny_models[kind]
    eng = make_engine(path, page_bucket_growth=1)
    rng = np.random.default_rng(5)
    lens = [1, 7, 8, 9, 33, 61]   # one token, page boundaries +-1, longer than the step budget
    reqs = []
    for i, n in enumerate(lens):
        sp = SamplingParams(max_tokens=int(rng.integers(3, 9)), temperature=0,
                            logprobs=5 if i % 3 != 2 else 0,
                            prompt_logprobs=3 if i % 2 else None)
        reqs.append(Request(f"r{i}", rng.integers(0, 384, n).tolist(), sp))
    reqs.append(Request("sampled", rng.integers(0, 384, 20).tolist(),
                        SamplingParams(max_tokens=8, temperature=0.8, seed=3, n=2, logprobs=4,
                                       prompt_logprobs=2)))
    plain = Request("plain", rng.integers(0, 384, 15).tolist(), SamplingParams(max_tokens=6,
                                                                               temperature=0))
    reqs.insert(3, plain)
    outs = eng.run(reqs)
    assert eng.last_stats.num_steps > 5
    for r, o in zip(reqs, outs):
        assert o.finish_reason == "length", o.error
        check_output(hf, r, o)
        if r.params.temperature == 0:
            assert o.token_ids == hf_greedy(hf, r), r.request_id
    smp = outs[-1].samples
    assert len(smp) == 2 and smp[0].token_ids != smp[1].token_ids
    assert outs[-1].logprobs == smp[0].logprobs


def test_prompt_logprobs_with_a_shared_prefix(tiny_models):
    """Requests sharing a long prefix: those asking for prompt logprobs prefill their whole prompt
    (every position's logits), the others still share the prefix, and everything stays exact."""
    path, hf = tiny_models["tied"]
    eng = make_engine(path, page_bucket_growth=1)
    rng = np.random.default_rng(8)
    prefix = rng.integers(0, 384, 45).tolist()
    suffixes = [[t] + rng.integers(0, 384, int(rng.integers(2, 9))).tolist()
                for t in rng.choice(384, 6, replace=False).tolist()]
    reqs = []
    for i, suf in enumerate(suffixes):
        sp = SamplingParams(max_tokens=5, temperature=0,
                            prompt_logprobs=3 if i in (1, 4) else None,
                            logprobs=2 if i in (1, 2) else None)
        reqs.append(Request(f"q{i}", prefix + suf, sp))
    outs = eng.run(reqs)
    for r, o in zip(reqs, outs):
        check_output(hf, r, o)
        assert o.token_ids == hf_greedy(hf, r), r.request_id
    st = eng.last_stats
    own = sum(len(reqs[i].prompt_ids) for i in (1, 4))
    shared = len(prefix) + sum(len(suffixes[i]) for i in (0, 2, 3, 5))
    assert st.computed_prefill_tokens == st.optimal_prefill_tokens == own + shared
    assert st.num_shared_prefixes == 1


def test_fused_blocks_with_extras_equal_single_steps(tiny_models):
    """Fused decode blocks carry logprobs and penalty history on device: same tokens, logprobs
    and finish reasons as single steps (stop ids and min_tokens inside blocks included)."""
    path, hf = tiny_models["llama3"]
    rng = np.random.default_rng(13)
    reqs = []
    for i in range(7):
        kw = dict(max_tokens=int(rng.integers(6, 20)), temperature=0)
        if i % 2 == 0:
            kw["logprobs"] = 3
        if i in (1, 2):
            kw.update(frequency_penalty=1.2, repetition_penalty=1.4)
        if i == 3:
            kw.update(temperature=0.9, seed=7, presence_penalty=1.0, logprobs=1, n=2)
        reqs.append(Request(f"f{i}", rng.integers(0, 384, int(rng.integers(3, 30))).tolist(),
                            SamplingParams(**kw)))
    single = make_engine(path, page_bucket_growth=1)
    ref = single.run(reqs)
    # Stop ids that hit inside a block, one of them held back by min_tokens.
    reqs[0].params = SamplingParams(max_tokens=19, temperature=0, logprobs=3,
                                    stop_token_ids=[ref[0].token_ids[5]])
    reqs[1].params = SamplingParams(max_tokens=19, temperature=0, frequency_penalty=1.2,
                                    min_tokens=4, stop_token_ids=[ref[1].token_ids[2]])
    fused = make_engine(path, page_bucket_growth=1, fused_decode_steps=4)
    out_s = single.run(reqs)
    out_f = fused.run(reqs)
    assert fused.last_stats.fused_blocks > 0
    assert any(k[0] == "block_extras" for k in fused.runner._compiled)
    for a, b in zip(out_s, out_f):
        assert len(a.samples) == len(b.samples)
        for x, y in zip(a.samples, b.samples):
            assert (x.token_ids, x.finish_reason) == (y.token_ids, y.finish_reason), a.request_id
            if x.logprobs is None:
                assert y.logprobs is None
                continue
            assert len(x.logprobs) == len(y.logprobs) == len(x.token_ids)
            for dx, dy in zip(x.logprobs, y.logprobs):
                assert list(dx) == list(dy)
                assert max(abs(dx[t] - dy[t]) for t in dx) < 1e-5
    assert out_f[0].finish_reason == "stop" and len(out_f[0].token_ids) <= 6
    for r, o in zip(reqs, out_f):
        check_output(hf, r, o)


def test_preemption_recompute_keeps_extras_exact(tiny_models):
    """vLLM-style preemption (recompute from the prompt): logprobs stay one per token, prompt
    logprobs are recorded once, and penalised greedy output still equals the reference decode."""
    from tests.test_penalties import reference_greedy

    path, hf = tiny_models["qwen2"]
    rng = np.random.default_rng(11)
    reqs = []
    for i in range(10):
        kw = dict(max_tokens=int(rng.integers(10, 36)), temperature=0)
        if i % 2:
            kw.update(logprobs=2, prompt_logprobs=1)
        if i % 3 == 0:
            kw.update(frequency_penalty=1.0, repetition_penalty=1.2)
        reqs.append(Request(f"r{i}", rng.integers(0, 384, int(rng.integers(5, 40))).tolist(),
                            SamplingParams(**kw)))
    eng = make_engine(path, num_pages=25, admission_control=False, page_bucket_growth=1)
    outs = eng.run(reqs)
    assert eng.last_stats.preemptions > 0
    for r, o in zip(reqs, outs):
        check_output(hf, r, o)
        want = (reference_greedy(hf, r.prompt_ids, r.params, r.params.max_tokens)
                if r.params.has_penalties else hf_greedy(hf, r))
        assert o.token_ids == want, r.request_id
