"""Issue #3: the engine's scheduling, compilation and sampling guarantees on tiny HF models."""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
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


def _count_compiles():
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    return compiles, listener


def test_no_compile_after_startup(tiny_models):
    """Every program a batch can reach is compiled before its first step, and only those: a
    second run of the same batch compiles nothing at all."""
    path, _ = tiny_models["llama3"]
    eng = make_engine(path, max_num_batched_tokens=64, num_pages=400, compilation_cache_dir="off")
    assert eng.runner.num_compiled == 0          # nothing is compiled before a batch is known
    reqs = ragged_requests(120, 384, seed=3, max_prompt=200, max_out=40)
    outs = eng.run(reqs)
    st = eng.last_stats
    assert all(o.finish_reason == "length" for o in outs)
    assert st.mid_run_compiles == 0
    assert st.compiled_programs == eng.runner.num_compiled > 0
    compiles, listener = _count_compiles()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        eng.run(reqs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} programs compiled by a second run"
    assert eng.last_stats.compiled_programs == 0
    # A batch of short prompts reaches fewer programs than it could: no wider page table than its
    # longest sample, no token bucket beyond what its prompts fill.
    small = make_engine(path, max_num_batched_tokens=64, num_pages=400, compilation_cache_dir="off")
    small.run(ragged_requests(3, 384, seed=4, max_prompt=9, max_out=4))
    assert 0 < small.runner.num_compiled < eng.runner.num_compiled


def test_extras_programs_compiled_at_start(tiny_models):
    """A batch mixing plain, logprobs, prompt-logprobs and penalty requests (single steps and fused
    blocks) compiles every program it uses before its first step: no compile event mid-run."""
    path, _ = tiny_models["tied"]
    eng = make_engine(path, fused_decode_steps=4, compilation_cache_dir="off")
    reqs = ragged_requests(12, 384, seed=8, max_prompt=50, max_out=20)
    reqs[1].params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    reqs[4].params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=2)
    reqs[7].params = SamplingParams(max_tokens=15, temperature=0.7, seed=3, presence_penalty=0.5,
                                    repetition_penalty=1.2)
    reqs[9].params = SamplingParams(max_tokens=10, temperature=0, logprobs=1, prompt_logprobs=0,
                                    frequency_penalty=0.3)
    outs = eng.run(reqs)
    st = eng.last_stats
    assert st.mid_run_compiles == 0, st.mid_run_compiles
    assert st.fused_blocks > 0
    assert outs[1].logprobs is not None and len(outs[1].logprobs) == 12
    assert outs[4].prompt_logprobs is not None and outs[4].prompt_logprobs[1] is not None
    assert all(o.finish_reason in ("length", "stop") for o in outs)
    assert st.compiled_programs == eng.runner.num_compiled


def test_a_shorter_batch_runs_on_the_wider_programs_already_compiled(tiny_models):
    """One page width a batch (the kernels' setting): a batch of shorter requests after a longer
    one reuses the programs compiled for the wider page table (a notebook's second generate, a
    benchmark's warm-up) and compiles nothing, with the outputs a fresh engine gives."""
    path, hf = tiny_models["llama3"]
    long = ragged_requests(10, hf.config.vocab_size, seed=31, max_prompt=120, max_out=30)
    short = ragged_requests(6, hf.config.vocab_size, seed=32, max_prompt=12, max_out=6)
    eng = make_engine(path, page_bucket_growth=1, compilation_cache_dir="off")
    eng.run(long)
    n = eng.runner.num_compiled
    got = eng.run(short)
    assert eng.last_stats.compiled_programs == 0 and eng.runner.num_compiled == n
    fresh = make_engine(path, page_bucket_growth=1, compilation_cache_dir="off")
    want = fresh.run(short)
    assert fresh.last_stats.compiled_programs > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_mid_token_buckets_change_no_output(tiny_models):
    """1.5x token buckets (on by default on accelerators) pad a step to the nearer bucket: the
    engine picks them, steps are padded less, and every output is the same."""
    from jaxserve.runner.buckets import BucketSet

    b = BucketSet.make(16384, 1024, 72, mid_from=256)
    assert b.token_buckets[:6] == (16, 32, 64, 128, 256, 384)
    assert b.token_bucket(716) == 768 and b.token_bucket(1025) == 1536 and b.token_buckets[-1] == 16384
    assert BucketSet.make(2048, 256, 72).token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    path, hf = tiny_models["llama3"]
    reqs = ragged_requests(24, hf.config.vocab_size, seed=9, max_prompt=60, max_out=20)
    pow2 = make_engine(path, max_num_batched_tokens=64, token_bucket_mid_from=0)
    mid = make_engine(path, max_num_batched_tokens=64, token_bucket_mid_from=16)
    assert mid.buckets.token_buckets == (16, 24, 32, 48, 64)
    a, b_ = pow2.run(reqs), mid.run(reqs)
    assert [o.token_ids for o in a] == [o.token_ids for o in b_]
    assert {k.tokens for k in mid.runner.programs.keys()} & {24, 48}
    assert mid.last_stats.padded_tokens < pow2.last_stats.padded_tokens


def test_quarter_token_buckets_change_no_output(tiny_models):
    """1.25x / 1.75x token buckets from `token_bucket_quarter_from` (8,192 on accelerators): the
    H200's BatchLLM prefill steps of 13,760 tokens run in a 14,336-token program instead of
    16,384; on a tiny model the engine picks them and every output is the same."""
    from jaxserve.engine.sizing import QUARTER_BUCKETS_FROM, resolve_token_bucket_quarter_from
    from jaxserve.runner.buckets import BucketSet

    b = BucketSet.make(16384, 1024, 72, mid_from=256, quarter_from=8192)
    assert b.token_buckets[-5:] == (8192, 10240, 12288, 14336, 16384)
    assert b.token_bucket(13760) == 14336 and b.token_bucket(5000) == 6144
    assert BucketSet.make(16384, 1024, 72, mid_from=256).token_bucket(13760) == 16384
    assert resolve_token_bucket_quarter_from(EngineConfig(), "gpu") == QUARTER_BUCKETS_FROM
    assert resolve_token_bucket_quarter_from(EngineConfig(), "cpu") == 0
    assert resolve_token_bucket_quarter_from(EngineConfig(token_bucket_quarter_from=0), "gpu") == 0
    with pytest.raises(ConfigError, match="token_bucket_quarter_from"):
        EngineConfig(token_bucket_quarter_from=-1)
    path, hf = tiny_models["llama3"]
    reqs = ragged_requests(24, hf.config.vocab_size, seed=9, max_prompt=60, max_out=20)
    plain = make_engine(path, max_num_batched_tokens=64, token_bucket_mid_from=0)
    quarter = make_engine(path, max_num_batched_tokens=64, token_bucket_mid_from=0,
                          token_bucket_quarter_from=32)
    assert quarter.buckets.token_buckets == (16, 32, 40, 48, 56, 64)
    a, b_ = plain.run(reqs), quarter.run(reqs)
    assert [o.token_ids for o in a] == [o.token_ids for o in b_]
    assert {k.tokens for k in quarter.runner.programs.keys()} & {40, 56}
    assert quarter.last_stats.padded_tokens < plain.last_stats.padded_tokens


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
    assert any(k.steps > 1 for k in fused.runner.programs.keys())
    assert not any(k.steps > 1 for k in single.runner.programs.keys())
    for a, b in zip(out_s, out_f):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), a.request_id
    assert out_f[0].finish_reason == "stop" and len(out_f[0].token_ids) <= 6
    stops1 = set(reqs[1].params.stop_token_ids)
    assert not stops1 & set(out_f[1].token_ids[:6])
    assert out_f[1].finish_reason == "length" or out_f[1].token_ids[-1] in stops1
    # Fused blocks really ran.
    assert fused.last_stats.fused_blocks > 0 and single.last_stats.fused_blocks == 0


def test_decode_blocks_fuse_while_waiting_work_cannot_fit(tiny_models, monkeypatch):
    """With the KV pool full, samples that wait cannot start until a running one ends: decode
    steps fuse meanwhile (they changed no admission), and the outputs equal single steps'."""
    from jaxserve.scheduler import scheduler as sched_mod

    path, hf = tiny_models["llama3"]
    rng = np.random.default_rng(5)
    reqs = [Request(f"r{i}", rng.integers(0, hf.config.vocab_size, 20).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(18, 28)), temperature=0))
            for i in range(10)]
    single = make_engine(path, max_num_seqs=8, num_pages=24)
    ref = single.run(reqs)
    reqs[3].params = SamplingParams(max_tokens=27, temperature=0,
                                    stop_token_ids=[ref[3].token_ids[9]])   # ends mid-block
    ref = single.run(reqs)
    blocks_while_waiting = []
    orig = sched_mod.Scheduler.schedule_decode_block

    def spy(self, n):
        plan = orig(self, n)
        if plan is not None and self.waiting:
            blocks_while_waiting.append(len(self.waiting))
        return plan

    monkeypatch.setattr(sched_mod.Scheduler, "schedule_decode_block", spy)
    fused = make_engine(path, max_num_seqs=8, num_pages=24, fused_decode_steps=4)
    out = fused.run(reqs)
    # 23 usable pages of 8 tokens hold 3-4 rows at full length: the rest wait for them.
    assert single.last_stats.peak_kv_pages >= 20
    assert blocks_while_waiting, "no decode block was fused while samples waited"
    for a, b in zip(ref, out):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), a.request_id
    assert out[3].finish_reason == "stop"


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


@pytest.mark.parametrize("kind,fused", [("llama3", 1), ("qwen2", 4)])
def test_overlap_on_and_off_give_identical_outputs(kind, fused, tiny_models):
    """Host/device overlap (step N + 1 planned and sent before step N's tokens are read) changes
    no output: greedy and seeded sampling, stop ids hit mid-run (one dropped step each), min_tokens,
    n > 1, shared prefixes, fused blocks; and it really ran ahead."""
    path, hf = tiny_models[kind]
    reqs = ragged_requests(18, hf.config.vocab_size, seed=17, max_prompt=60, max_out=30)
    shared = list(range(3, 40))
    reqs += [Request(f"s{i}", shared + [50 + i] * (i + 1), SamplingParams(max_tokens=12 + i,
             temperature=0.0)) for i in range(4)]
    ref = make_engine(path, async_scheduling=False, fused_decode_steps=fused).run(reqs)
    reqs[0].params = SamplingParams(max_tokens=25, temperature=0, stop_token_ids=[ref[0].token_ids[3]])
    reqs[1].params = SamplingParams(max_tokens=25, temperature=0, min_tokens=5,
                                    stop_token_ids=[ref[1].token_ids[1], ref[1].token_ids[6]])
    reqs[2].params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=4, n=3)
    sync = make_engine(path, async_scheduling=False, fused_decode_steps=fused)
    ahead = make_engine(path, async_scheduling=True, fused_decode_steps=fused)
    out_s, out_a = sync.run(reqs), ahead.run(reqs)
    for a, b in zip(out_s, out_a):
        assert [x.token_ids for x in a.samples] == [x.token_ids for x in b.samples], a.request_id
        assert a.finish_reason == b.finish_reason
    # The same with every program launched from the runner's launch thread.
    threaded = make_engine(path, async_scheduling=True, fused_decode_steps=fused,
                           launch_thread=True)
    launched_on = set()
    launch = threaded.runner._launch

    def spy(key, inputs):
        launched_on.add(threading.current_thread().name)
        return launch(key, inputs)

    threaded.runner._launch = spy
    for a, b in zip(out_s, threaded.run(reqs)):
        assert [x.token_ids for x in a.samples] == [x.token_ids for x in b.samples], a.request_id
        assert a.finish_reason == b.finish_reason
    assert len(launched_on) == 1 and next(iter(launched_on)).startswith("jaxserve-launch")
    stop0 = ref[0].token_ids[3]
    assert out_a[0].finish_reason == "stop"
    assert out_a[0].token_ids == ref[0].token_ids[:ref[0].token_ids.index(stop0) + 1]
    for r, o in zip(reqs[3:18], out_a[3:18]):
        assert o.token_ids == hf_greedy(hf, r), r.request_id
    # Ahead of the host: a sample that stopped had one more step planned (its token dropped).
    st_s, st_a = sync.last_stats, ahead.last_stats
    assert st_a.generated_tokens == st_s.generated_tokens
    assert st_a.computed_prefill_tokens == st_s.computed_prefill_tokens
    assert st_s.dropped_tokens == 0 < st_a.dropped_tokens


def test_programs_load_from_the_cache_on_a_second_start(tiny_models, tmp_path, monkeypatch):
    """A second engine with the same model and settings loads every program from the executable
    cache (no tracing, no compile) and computes the same tokens; other settings never load a
    stale program, and a corrupt entry costs only a compile. (The cache keeps accelerator
    programs; here it is let on the CPU for greedy programs, which survive serialisation there.)"""
    import os

    from jaxserve.runner import model_runner

    monkeypatch.setattr(model_runner, "EXECUTABLE_CACHE_BACKENDS", ("cpu",))
    path, _ = tiny_models["tied"]
    reqs = ragged_requests(6, 384, seed=9, max_prompt=30, max_out=8)
    cold = make_engine(path, compilation_cache_dir=str(tmp_path))
    ref = [o.token_ids for o in cold.run(reqs)]
    assert cold.last_stats.compile_cache_hits == 0 and cold.last_stats.compiled_programs > 0
    compiles, listener = _count_compiles()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        warm = make_engine(path, compilation_cache_dir=str(tmp_path))
        out = [o.token_ids for o in warm.run(reqs)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    st = warm.last_stats
    assert out == ref
    assert st.compile_cache_hits == st.compiled_programs == cold.last_stats.compiled_programs
    assert compiles == []
    other = make_engine(path, compilation_cache_dir=str(tmp_path), page_size=16)
    assert [o.token_ids for o in other.run(reqs)] == ref
    assert other.runner.programs.cache_hits == 0     # another layout: nothing loaded
    # The kernels' environment switches change block sizes and so the programs' input shapes:
    # a program built without them must not be loaded with them (H200: a TypeError at step 1).
    for name, value in (("JAXSERVE_SHARED_BLOCK_ROWS", "128"), ("JAXSERVE_ATTN_PREFETCH", "none")):
        monkeypatch.setenv(name, value)
        switched = make_engine(path, compilation_cache_dir=str(tmp_path))
        assert [o.token_ids for o in switched.run(reqs)] == ref
        assert switched.runner.programs.cache_hits == 0, name
        monkeypatch.delenv(name)
    folder = os.path.join(str(tmp_path), "jaxserve-programs")
    for f in os.listdir(folder):
        with open(os.path.join(folder, f), "wb") as fh:
            fh.write(b"not an executable")
    again = make_engine(path, compilation_cache_dir=str(tmp_path))
    assert [o.token_ids for o in again.run(reqs)] == ref
    assert again.runner.programs.cache_hits == 0


def test_gpu_programs_compile_without_command_buffers():
    """On GPU the step programs are compiled without XLA's command buffers unless asked (every
    step's buffers change; 3 % faster end to end without them on the H200, benchmarks/README.md)."""
    from jaxserve.runner.programs import COMPILER_OPTIONS, ProgramKey, ProgramSet, compiler_options

    assert compiler_options("gpu", False) == {**COMPILER_OPTIONS, "xla_gpu_enable_command_buffer": ""}
    assert compiler_options("gpu", True) == COMPILER_OPTIONS
    assert compiler_options("cpu", False) == compiler_options("tpu", False) == COMPILER_OPTIONS
    # The options a program set is given are the ones every program is compiled with.
    seen = []

    class Lowered:
        def compile(self, compiler_options=None):
            seen.append(compiler_options)
            return object()

    opts = compiler_options("gpu", False)
    ProgramSet(lambda key: Lowered(), options=opts).compile([ProgramKey(16, 2), ProgramKey(32, 2)])
    assert seen == [opts, opts]
