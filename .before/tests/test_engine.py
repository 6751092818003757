"""Issue #3: the engine's scheduling, compilation and sampling guarantees on tiny HF models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine, Request
from jaxserve.sampling_params import SamplingParams
from jaxserve.weights.assemble import build_model
from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint


def make_engine(path, **kw):
    cfg = ModelConfig.from_json_file(f"{path}/config.json")
    ck = SafetensorsCheckpoint(path)
    model = build_model(cfg, ck.get, jnp.float32, ck.where)
    ecfg = dict(page_size=8, max_num_batched_tokens=32, max_num_seqs=16, max_model_len=256,
                num_pages=160, attention_impl="reference")
    ecfg.update(kw)
    return Engine(cfg, model, EngineConfig(**ecfg))


def ragged_requests(n, vocab, seed, max_prompt=90, max_out=24, **sp):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        plen = int(rng.integers(1, max_prompt))
        params = SamplingParams(max_tokens=int(rng.integers(1, max_out)), **({"temperature": 0.0} | sp))
        reqs.append(Request(f"r{i}", rng.integers(0, vocab, plen).tolist(), params))
    return reqs


def hf_greedy(hf, req):
    with torch.no_grad():
        out = hf.generate(torch.tensor([req.prompt_ids]), max_new_tokens=req.params.max_tokens,
                          min_new_tokens=req.params.max_tokens, do_sample=False,
                          attention_mask=torch.ones(1, len(req.prompt_ids), dtype=torch.long))
    return out[0, len(req.prompt_ids):].tolist()


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2", "tied"])
def test_batched_greedy_equals_alone_and_transformers(kind, tiny_models):
    path, hf = tiny_models[kind]
    eng = make_engine(path)
    reqs = ragged_requests(32, hf.config.vocab_size, seed=7)
    outs = eng.run(reqs)
    st = eng.last_stats
    # The budget (32 tokens) forces long prompts (up to 89 tokens) over >= 3 prefill steps, and the
    # spread of output lengths makes requests finish and others join mid-run.
    assert max(len(r.prompt_ids) for r in reqs) > 2 * 32
    assert st.num_steps > 10
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    for r, o in zip(reqs, outs):
        assert o.finish_reason == "length" and len(o.token_ids) == r.params.max_tokens
    # Each prompt alone gives the same tokens.
    for r, o in zip(reqs[:8], outs[:8]):
        assert eng.run([r])[0].token_ids == o.token_ids, r.request_id
    # transformers' greedy generate gives the same tokens.
    for r, o in zip(reqs, outs):
        assert o.token_ids == hf_greedy(hf, r), r.request_id


def test_no_compile_after_startup(tiny_models):
    path, _ = tiny_models["llama3"]
    eng = make_engine(path, max_num_batched_tokens=64, num_pages=400)
    expected = len(eng.buckets.all())
    assert eng.runner.num_compiled == expected
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        reqs = ragged_requests(120, 384, seed=3, max_prompt=200, max_out=40)
        outs = eng.run(reqs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(o.finish_reason == "length" for o in outs)
    assert compiles == [], f"{len(compiles)} programs compiled during the run"
    assert eng.runner.num_compiled == expected
    assert eng.last_stats.compiled_programs == expected


def test_preemption_recomputes_correctly(tiny_models):
    path, hf = tiny_models["qwen2"]
    reqs = ragged_requests(12, hf.config.vocab_size, seed=11, max_prompt=40, max_out=40)
    # 24 usable pages of 8 tokens: fewer than the batch's running requests need at full length.
    eng = make_engine(path, num_pages=25, admission_control=False)
    outs = eng.run(reqs)
    assert eng.last_stats.preemptions > 0
    assert eng.last_stats.peak_kv_pages <= 24
    for r, o in zip(reqs, outs):
        assert o.token_ids == hf_greedy(hf, r), r.request_id


def test_seeded_sampling_independent_of_batch(tiny_models):
    path, hf = tiny_models["tied"]
    eng = make_engine(path)
    target = Request("t", list(range(5, 30)),
                     SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234))
    others_a = ragged_requests(10, hf.config.vocab_size, seed=1, temperature=1.0)
    others_b = ragged_requests(5, hf.config.vocab_size, seed=2, temperature=0.7, min_p=0.05)
    out_a = eng.run(others_a[:4] + [target] + others_a[4:])[4]
    out_b = eng.run([target] + others_b)[0]
    assert out_a.token_ids == out_b.token_ids
    # ... and the seed matters: another seed gives another text (20 tokens from 384: no collision).
    other = Request("t2", target.prompt_ids, SamplingParams(max_tokens=20, temperature=0.9,
                                                              top_p=0.9, top_k=50, seed=99))
    assert eng.run([other])[0].token_ids != out_a.token_ids


def test_stop_tokens_and_bad_requests(tiny_models):
    path, hf = tiny_models["llama3"]
    eng = make_engine(path, max_model_len=128)
    good = ragged_requests(4, hf.config.vocab_size, seed=5, max_prompt=30, max_out=30)
    # A stop id: the first token greedy decoding would produce at step 3 of request 0.
    ref0 = hf_greedy(hf, Request("x", good[0].prompt_ids, SamplingParams(max_tokens=5, temperature=0)))
    stop = ref0[2]
    good[0] = Request("r0", good[0].prompt_ids, SamplingParams(max_tokens=20, temperature=0,
                                                               stop_token_ids=[stop]))
    bad = [
        Request("empty", [], SamplingParams()),
        Request("long", list(range(130)), SamplingParams()),
        Request("oov", [1, 2, 100000], SamplingParams()),
        Request("pre", [1], SamplingParams(), error="invalid request: field 'top_p' ..."),
    ]
    outs = eng.run(bad[:2] + good[:2] + bad[2:] + good[2:])
    by_id = {o.request_id: o for o in outs}
    assert by_id["empty"].finish_reason == "error" and "empty prompt" in by_id["empty"].error
    assert "max_model_len" in by_id["long"].error
    assert "vocabulary" in by_id["oov"].error
    assert by_id["pre"].error.startswith("invalid request")
    r0 = by_id["r0"]
    assert r0.finish_reason == "stop" and r0.token_ids[-1] == stop and stop not in r0.token_ids[:-1]
    assert r0.token_ids == ref0[:ref0.index(stop) + 1]
    for r in good[1:]:
        assert by_id[r.request_id].token_ids == hf_greedy(hf, r)


def test_max_model_len_caps_generation(tiny_models):
    path, _ = tiny_models["tied"]
    eng = make_engine(path, max_model_len=40)
    out = eng.run([Request("a", list(range(1, 31)), SamplingParams(max_tokens=50, temperature=0))])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_min_tokens_bans_stop_ids(tiny_models):
    path, hf = tiny_models["tied"]
    eng = make_engine(path)
    prompt = list(range(40, 60))
    ref = hf_greedy(hf, Request("x", prompt, SamplingParams(max_tokens=3, temperature=0)))
    stop = ref[0]
    out = eng.run([Request("a", prompt, SamplingParams(max_tokens=6, temperature=0, min_tokens=4,
                                                       stop_token_ids=[stop]))])[0]
    assert stop not in out.token_ids[:4]
    assert len(out.token_ids) >= 4


@pytest.mark.parametrize("n_fused", [4])
def test_fused_decode_blocks_equal_single_steps(n_fused, tiny_models):
    """Fusing decode steps (on-device stop and max-token handling) changes no output."""
    path, hf = tiny_models["llama3"]
    reqs = ragged_requests(20, hf.config.vocab_size, seed=21, max_prompt=40, max_out=30)
    # Stop ids that greedy decoding hits mid-block, and min_tokens holding one back.
    for r in reqs[:2]:
        r.params = SamplingParams(max_tokens=29, temperature=0)
    single = make_engine(path, max_num_seqs=8)
    ref = single.run(reqs)
    reqs[0].params = SamplingParams(max_tokens=29, temperature=0, stop_token_ids=[ref[0].token_ids[5]])
    reqs[1].params = SamplingParams(max_tokens=29, temperature=0, min_tokens=6,
                                    stop_token_ids=[ref[1].token_ids[2], ref[1].token_ids[7]])
    reqs[2].params = SamplingParams(max_tokens=25, temperature=0.8, top_k=20, seed=5)
    fused = make_engine(path, max_num_seqs=8, fused_decode_steps=n_fused)
    out_s = single.run(reqs)
    out_f = fused.run(reqs)
    assert fused.runner.num_compiled > single.runner.num_compiled
    for a, b in zip(out_s, out_f):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), a.request_id
    assert out_f[0].finish_reason == "stop" and len(out_f[0].token_ids) <= 6
    stops1 = set(reqs[1].params.stop_token_ids)
    assert not stops1 & set(out_f[1].token_ids[:6])
    assert out_f[1].finish_reason == "length" or out_f[1].token_ids[-1] in stops1
    # Fused blocks really ran.
    assert fused.last_stats.fused_blocks > 0 and single.last_stats.fused_blocks == 0


def test_n_samples_share_the_prompt_and_differ(tiny_models):
    """n > 1: the samples share the prompt's KV (all but each one's last prompt token is computed
    once), greedy samples equal the n=1 output, seeded samples are distinct and reproducible."""
    path, hf = tiny_models["tied"]
    eng = make_engine(path)
    prompt = list(range(7, 47))
    greedy = eng.run([Request("g", prompt, SamplingParams(max_tokens=8, temperature=0, n=3))])[0]
    assert [s.token_ids for s in greedy.samples] == [hf_greedy(hf, Request("x", prompt, SamplingParams(
        max_tokens=8, temperature=0)))] * 3
    assert eng.last_stats.computed_prefill_tokens == len(prompt) - 1 + 3
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=11, n=4)
    a = eng.run([Request("a", prompt, sp)])[0]
    b = eng.run([Request("z", [3, 4, 5], SamplingParams(max_tokens=5)), Request("a", prompt, sp)])[1]
    assert len({tuple(s.token_ids) for s in a.samples}) == 4
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    # Sample 0 of n=4 is the same stream as n=1 with that seed.
    one = eng.run([Request("o", prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=11))])[0]
    assert one.token_ids == a.samples[0].token_ids == a.token_ids
