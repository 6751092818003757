"""Issue #18: BlendServe's resource-aware order and admission, the host-only simulation with the
measured step-time model, `schedule_policy="auto"`, and sampled output-length estimates.

Host-only tests run the real planner and `Scheduler` over fake tokens (`engine/simulate.py`);
engine tests use a tiny random model and check outputs against fifo's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine import length_estimate
from jaxserve.engine.cost_model import StepCosts, device_profile
from jaxserve.engine.simulate import CANDIDATES, _Result, choose_policy, simulate
from jaxserve.runner.buckets import BucketSet
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import PagePool, Sample, Scheduler
from jaxserve.scheduler.admission import for_plan
from jaxserve.scheduler.density import Costs, DensityModel, kv_reads, matmul_params
from jaxserve.scheduler.planner import BlendOptions, Unit, _dual_scan, plan_batch
from jaxserve.tools import mix_workloads, workloads
from jaxserve.weights.presets import load_preset

CFG = load_preset("llama-3-8b")
COSTS = StepCosts.make(device_profile("h200"), CFG)
DENSITY = DensityModel.for_model(CFG)


def make_samples(specs, seed=0, max_len=4608, ignore_eos=True):
    """Samples with random prompts of (prompt length, output length); each starts with its own
    token, so none shares a prefix."""
    rng = np.random.default_rng(seed)
    return [Sample(prompt_ids=[256 + i] + rng.integers(256, 128000, p - 1).tolist(), index=i,
                   request=i, params=SamplingParams(max_tokens=d, ignore_eos=ignore_eos),
                   max_len=max_len)
            for i, (p, d) in enumerate(specs)]


def from_requests(reqs, max_len=4608):
    return [Sample(prompt_ids=r["prompt_token_ids"], index=i, request=i,
                   params=SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True),
                   max_len=max_len) for i, r in enumerate(reqs)]


def sim(samples, policy, *, pages=40657, seqs=256, budget=2048, fast=True, **ecfg):
    ec = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=4608,
                      num_pages=pages, **ecfg)
    return simulate(samples, policy, ec, CFG, COSTS, num_pages=pages,
                    buckets=BucketSet.make(budget, seqs, 4608 // 16), fused_decode_steps=8,
                    density=DENSITY, fast=fast)


# -- the step-time model ---------------------------------------------------------------------
def test_cost_model_reproduces_measured_h200_runs():
    """The simulation, with the step-time model fitted on the H200, gives the measured run times
    (within 4 %) and exactly the measured steps of three Llama-3-8B runs (fifo; the first
    request, 3072 in / 512 out, fixes the programs' page width; lengths drawn as in that run).
    Those runs fused decode steps only when nothing waited (`fuse_while_stalled=False`)."""
    g = np.random.default_rng(0)

    def i(a, b):
        return int(g.integers(a, b))

    x = [(3072, 512)]
    longdec = x + [(i(512, 3072), i(8, 512)) for _ in range(384)]
    shortdec = x + [(64, i(8, 1024)) for _ in range(512)]
    sorted_mix = x + [(2048, 16)] * 256 + [(64, 512)] * 256
    for spec, seconds, steps in [(sorted_mix, 26.67, 1026), (longdec, 34.37, 861),
                                 (shortdec, 26.73, 1731)]:
        r = sim(make_samples(spec), "fifo", fuse_while_stalled=False)
        assert r.steps == steps
        assert abs(r.seconds - seconds) / seconds < 0.04, (r.seconds, seconds)


@pytest.mark.parametrize("pages", [40657, 3000])
def test_fast_forward_equals_step_by_step(pages):
    """Skipping decode-only stretches that cannot change gives exactly the step-by-step result,
    under a pool that admission fills (3000 pages) and one it does not."""
    reqs = mix_workloads.generate(vocab_size=128256, seed=1, num_requests=240,
                                  shares={"generate": 0.4, "chat": 0.3, "summarize": 0.3},
                                  order="interleaved")
    for pol in CANDIDATES:
        a = sim(from_requests(reqs), pol, pages=pages, fast=False)
        b = sim(from_requests(reqs), pol, pages=pages, fast=True)
        assert (a.steps, a.plans) == (b.steps, b.plans) and abs(a.seconds - b.seconds) < 1e-9


# -- density, order, dual scan ------------------------------------------------------------------
def test_request_density_is_design_formula():
    p, d = 700, 300
    comp = 2 * matmul_params(CFG) * (p + d) / 7.9e14
    mem = (p * d + d * d / 2) * CFG.kv_bytes_per_token(2) / 4.3e12
    assert DENSITY.density(p + d, kv_reads(p, d)) == pytest.approx(comp / mem)


def test_group_density_counts_a_shared_prefix_once():
    """A group's unit computes its shared prefix once (its tokens: the tree's optimum) and reads
    it once per decode step, so its density is (1 - saved) of its members' taken alone."""
    rng = np.random.default_rng(2)
    shared = rng.integers(256, 128000, 500).tolist()
    seqs = [Sample(prompt_ids=shared + rng.integers(256, 128000, 20).tolist(), index=i, request=i,
                   params=SamplingParams(max_tokens=10, ignore_eos=True)) for i in range(8)]
    plan = plan_batch(seqs, sharing=True, policy="blendserve", model_cfg=CFG)
    (unit,) = plan.units
    assert unit.costs.tokens == pytest.approx(plan.optimal_prefill_tokens + 8 * 10)
    alone = Costs(8 * (520 + 10), 8 * kv_reads(520, 10))
    saved = 1 - unit.costs.tokens / alone.tokens
    assert saved > 0.8
    shared = plan.prefixes[0].num_tokens
    assert unit.costs.kv == pytest.approx(8 * kv_reads(520 - shared, 10) + shared * 10)
    assert unit.density == pytest.approx(
        (1 - saved) * DENSITY.comp(alone.tokens) / DENSITY.mem(unit.costs.kv))


def _densities(plan):
    return [u.density for u in plan.units]


def test_density_order_sorts_siblings_by_density():
    """With the dual scan off the units are the density order itself: memory-heavy first. A is
    decode-heavy by batchllm's ratio (d/p = 1) but compute-denser than B (p=1000, d=400), so the
    ratio order (density order off) puts A first and the density order B first."""
    spec = [(100, 100)] * 3 + [(1000, 400)] * 3
    on = plan_batch(make_samples(spec), sharing=True, policy="blendserve", model_cfg=CFG,
                    blend=BlendOptions(dual_scan=False))
    off = plan_batch(make_samples(spec), sharing=True, policy="blendserve", model_cfg=CFG,
                     blend=BlendOptions(dual_scan=False, density_order=False))
    assert _densities(on) == sorted(_densities(on))
    assert [len(u.samples[0].prompt_ids) for u in on.units][:3] == [1000] * 3
    assert [len(u.samples[0].prompt_ids) for u in off.units][:3] == [100] * 3


def test_dual_scan_takes_from_both_ends():
    units = [Unit([], Costs(t, k), t / k) for t, k in [(1, 100), (2, 100), (3, 100), (50, 100),
                                                       (60, 100), (70, 100)]]
    model = DensityModel()
    target = sum(u.costs.tokens for u in units) / sum(u.costs.kv for u in units)
    order = _dual_scan(units, target, model)
    assert order[:2] == [0, 5]                      # memory-heavy end, then compute-heavy end
    assert sorted(order) == list(range(6))
    spec = [(64, 384)] * 4 + [(1536, 16)] * 4
    plan = plan_batch(make_samples(spec), sharing=True, policy="blendserve", model_cfg=CFG)
    first, second = plan.units[0].density, plan.units[1].density
    assert first == min(_densities(plan)) and second == max(_densities(plan))


# -- admission ---------------------------------------------------------------------------------
CLUSTERED = [(64, 384)] * 200 + [(1536, 16)] * 200       # memory-heavy block, then compute-heavy


def _step_densities(r, upto=0.9):
    toks = np.array([p.tokens for p in r.trace], float)
    kv = np.array([p.kv_reads for p in r.trace], float)
    keep = np.cumsum(toks) <= upto * toks.sum()
    return DENSITY.comp(toks[keep]) / np.maximum(DENSITY.mem(kv[keep]), 1e-30)


@pytest.mark.parametrize("spec", [CLUSTERED, CLUSTERED[200:] + CLUSTERED[:200]],
                         ids=["memory_first", "compute_first"])
def test_step_density_stays_near_the_batch_density(spec):
    """Each planned step's density (tokens it computes over KV its decode rows read, up to 90 %
    of the work) stays within 2x of the batch's for 85 % of the steps under blendserve; fifo on
    the clustered input runs the two kinds apart (a third of its steps or fewer within 2x)."""
    batch = DENSITY.density(sum(p + d for p, d in spec), sum(kv_reads(p, d) for p, d in spec))

    def within(policy):
        rho = _step_densities(sim(make_samples(spec), policy, fast=False))
        return float((np.abs(np.log(rho / batch)) <= np.log(2)).mean())

    assert within("blendserve") >= 0.85
    assert within("fifo") <= 0.35


def test_admission_takes_compute_work_while_memory_work_runs():
    """More memory-heavy requests than rows, in a clustered order (density order, no dual scan):
    plan-order admission fills every row with memory-heavy work and starts the first
    compute-heavy request only when one of those finishes (~384 steps on); the blend admission
    takes the memory side first too (longest first) but keeps a row and the pages for the
    compute side, which starts within the first steps, while the memory side still runs."""
    spec = [(64, 384)] * 300 + [(1536, 16)] * 100

    def steps_before_first_compute(admission):
        seqs = make_samples(spec)
        plan = plan_batch(seqs, sharing=True, policy="blendserve", model_cfg=CFG,
                          blend=BlendOptions(dual_scan=False))
        sched = Scheduler(PagePool(40657, 16), 2048, 256, reserve=True,
                          admission=for_plan(plan, admission))
        sched.light_rows = True
        sched.add_all(seqs)
        for step in range(600):
            p = sched.schedule()
            if any(len(s.prompt_ids) == 1536 for s in p.owners if s.samples):
                memory_running = sum(len(s.prompt_ids) == 64 for s in sched.running)
                return step, memory_running
            sched.commit(p, _Result(np.full((1, len(p.rows)), 2, np.int32)))
        return None

    plain, _ = steps_before_first_compute(False)
    blend, memory_running = steps_before_first_compute(True)
    assert plain >= 300
    assert blend < 20 and memory_running >= 200


def test_priorities_still_come_first_under_blend_admission():
    seqs = make_samples(CLUSTERED[:8] + CLUSTERED[-8:])
    for s in seqs[:8]:
        s.priority = 1          # the memory-heavy ones are less urgent
    plan = plan_batch(seqs, sharing=True, policy="blendserve", model_cfg=CFG)
    sched = Scheduler(PagePool(40657, 16), 4096, 256, reserve=True, admission=for_plan(plan, True))
    sched.add_all(seqs)
    p = sched.schedule()
    assert {s.priority for s in p.owners} == {0}


def test_interleaved_groups_in_a_tight_pool_finish_under_every_policy():
    """A pool that holds few documents with interleaved groups (questions of one document far
    apart): resident prefixes whose members sit behind a request that does not fit used to hold
    the pool with nothing running (the scheduler looped on empty steps). Now every policy
    finishes, fifo within 1.5x of the grouped order."""
    reqs = mix_workloads.generate(vocab_size=128256, seed=3, num_requests=160,
                                  shares={"chat": 0.4, "summarize": 0.6}, order="interleaved")
    times = {pol: sim(from_requests(reqs), pol, pages=800) for pol in CANDIDATES}
    for pol, r in times.items():
        assert r.steps > 0
    assert times["fifo"].seconds < 1.5 * times["batchllm"].seconds


# -- auto --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["blend_mix3_clustered", "blend_chat_summarize_interleaved",
                                  "nosharing"])
def test_auto_picks_the_fastest_simulated_policy(name):
    reqs = workloads.preset(name, vocab_size=128256, scale=0.05, seed=4)
    ec = EngineConfig(max_num_batched_tokens=2048, max_num_seqs=256, max_model_len=4608,
                      num_pages=40657)
    kw = dict(num_pages=40657, buckets=BucketSet.make(2048, 256, 288), fused_decode_steps=8,
              density=DENSITY)
    choice, projected = choose_policy(from_requests(reqs), ec, CFG, COSTS, **kw)
    alone = {p: simulate(from_requests(reqs), p, ec, CFG, COSTS, **kw).seconds for p in CANDIDATES}
    assert projected == pytest.approx(alone)
    assert alone[choice] == min(alone.values())


# -- output-length estimates ---------------------------------------------------------------------
def test_sampled_length_estimates_within_20_percent():
    """Known lengths: 6 request templates (a shared 16-token head), each with its own output
    length (+-10 % per request), unfixed (EOS can stop them). A 5 % probe, run to its realised
    lengths, estimates the other requests within 20 % (mean relative error, and every
    template's mean), and says so itself (its leave-one-out error)."""
    rng = np.random.default_rng(5)
    heads = [rng.integers(256, 5000, 16).tolist() for _ in range(6)]
    true_len = [40, 80, 120, 200, 300, 450]
    seqs, truth = [], {}
    for i in range(600):
        k = i % 6
        s = Sample(prompt_ids=heads[k] + rng.integers(256, 5000, 30).tolist(), index=i, request=i,
                   params=SamplingParams(max_tokens=512), stop_ids=frozenset({2}))
        truth[i] = int(true_len[k] * rng.uniform(0.9, 1.1))
        seqs.append(s)
    probe = length_estimate.pick_probe(seqs, 0.05, seed=0)
    assert len(probe) == 30
    for s in probe:                                  # they ran: their outputs are real
        s.output_ids = [7] * truth[s.index]
    ids = {id(s) for s in probe}
    rest = [s for s in seqs if id(s) not in ids]
    rep = length_estimate.estimate(probe, rest)
    assert rep.estimated == len(rest) and rep.probe_error < 0.2
    err = [abs(s.expected_output_len - truth[s.index]) / truth[s.index] for s in rest]
    assert np.mean(err) < 0.2
    for k in range(6):
        est = np.mean([s.expected_output_len for s in rest if s.index % 6 == k])
        real = np.mean([truth[s.index] for s in rest if s.index % 6 == k])
        assert abs(est - real) / real < 0.2


def test_fixed_lengths_and_small_batches_keep_max_tokens():
    fixed = make_samples([(20, 30)] * 50)                   # ignore_eos: lengths are fixed
    assert length_estimate.pick_probe(fixed, 0.05, 0) == []
    small = make_samples([(20, 30)] * 6, ignore_eos=False)
    for s in small:
        s.stop_ids = frozenset({2})
    assert length_estimate.pick_probe(small, 0.01, 0) == []  # a probe of 4 would be most of it
    plan = plan_batch(small, sharing=True, policy="blendserve", model_cfg=CFG)
    assert all(s.expected_output_len is None for s in small) and plan.units


# -- workloads and the dry run ---------------------------------------------------------------------
def test_mix_presets_are_clustered_or_interleaved_mixes_with_sharing():
    names = [n for n in workloads.PRESETS if n.startswith("blend_")]
    assert len(names) == 6 and all(n.endswith(("_clustered", "_interleaved")) for n in names)
    reqs = workloads.preset("blend_mix3_clustered", vocab_size=128256, scale=0.1, seed=0)
    kinds = [mix_workloads.kind_of(r) for r in reqs]
    assert len(reqs) == 300 and set(kinds) == set(mix_workloads.KINDS)
    changes = sum(a != b for a, b in zip(kinds, kinds[1:]))
    assert changes == 2                                       # three contiguous blocks
    inter = workloads.preset("blend_mix3_interleaved", vocab_size=128256, scale=0.1, seed=0)
    ki = [mix_workloads.kind_of(r) for r in inter]
    assert sorted(ki) == sorted(kinds) and sum(a != b for a, b in zip(ki, ki[1:])) > 100
    from jaxserve.scheduler.prefix_tree import build_prefix_tree
    tree = build_prefix_tree([r["prompt_token_ids"] for r in reqs])
    assert tree.reuse_ratio > 0.3                             # documents, system prompts, templates


def test_dry_run_says_it_uses_max_tokens_and_projects_each_policy():
    from jaxserve.tools.dry_run import analyse, format_table

    reqs = workloads.preset("blend_gen_summarize_clustered", vocab_size=128256, scale=0.02)
    d = analyse(CFG, [r["prompt_token_ids"] for r in reqs],
                [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True) for r in reqs],
                device="h200")
    assert set(d["projected_seconds_by_policy"]) == set(CANDIDATES)
    assert "max_tokens" in d["output_lengths"]
    table = format_table(d)
    assert "simulated time by policy" in table and "auto:" in table


# -- the engine ----------------------------------------------------------------------------------
def _mixed_requests(vocab, seed=6, n_unfixed=0):
    from jaxserve.engine import Request

    rng = np.random.default_rng(seed)
    doc = rng.integers(3, vocab, 40).tolist()
    system = rng.integers(3, vocab, 12).tolist()
    specs = []
    for i in range(6):      # compute-heavy: a shared document, short answers
        specs.append((doc + rng.integers(3, vocab, 4).tolist(), 2 + i % 3))
    for i in range(8):      # memory-heavy: a shared system prompt, long answers
        specs.append((system + rng.integers(3, vocab, 3).tolist(), 18 + i))
    for i in range(6):      # alone
        specs.append((rng.integers(3, vocab, int(rng.integers(5, 60))).tolist(), 4 + 2 * i))
    # Unfixed lengths: a stop token the tiny model may draw.
    reqs = [Request(f"r{i}", ids, SamplingParams(max_tokens=d, temperature=0.0, ignore_eos=True,
                                                 stop_token_ids=(5,) if i < n_unfixed else ()))
            for i, (ids, d) in enumerate(specs)]
    order = rng.permutation(len(reqs))
    return [reqs[i] for i in order]


SETTINGS = {
    "batchllm": dict(schedule_policy="batchllm"),
    "blendserve": dict(schedule_policy="blendserve"),
    "auto": dict(schedule_policy="auto"),
    "no_density_order": dict(schedule_policy="blendserve", blend_density_order=False),
    "no_dual_scan": dict(schedule_policy="blendserve", blend_dual_scan=False),
    "no_admission": dict(schedule_policy="blendserve", blend_admission=False),
}


@pytest.fixture(scope="module")
def blend_engine(tiny_models):
    from tests.test_engine import make_engine

    path, hf = tiny_models["llama3"]
    return make_engine(path, schedule_policy="fifo", num_pages=64), hf.config.vocab_size


def _run(eng, reqs, **settings):
    base = eng.ecfg
    eng.ecfg = dataclasses.replace(base, **settings)
    try:
        return eng.run(reqs), eng.last_stats
    finally:
        eng.ecfg = base


def test_outputs_identical_under_every_policy(blend_engine):
    """Greedy tokens do not depend on the order work runs in: every policy and every blend
    switch gives fifo's outputs (shared prefixes, a pool that admission fills, samples joining
    and leaving at every step)."""
    eng, vocab = blend_engine
    reqs = _mixed_requests(vocab)
    ref, st = _run(eng, reqs)
    assert st.peak_kv_pages > 0.6 * (eng.num_pages - 1)       # the pool limits the batch
    for name, settings in SETTINGS.items():
        out, st = _run(eng, reqs, **settings)
        assert [o.token_ids for o in out] == [o.token_ids for o in ref], name
        assert st.computed_prefill_tokens == st.optimal_prefill_tokens, name
        if name == "auto":
            assert set(st.projected_seconds) == set(CANDIDATES)
            assert st.schedule_policy == min(st.projected_seconds, key=st.projected_seconds.get)


def test_auto_on_a_large_batch_simulates_a_part_of_it(blend_engine, monkeypatch):
    import jaxserve.engine.engine as engine_module

    eng, vocab = blend_engine
    reqs = _mixed_requests(vocab)
    ref, _ = _run(eng, reqs)
    monkeypatch.setattr(engine_module, "AUTO_MAX_SAMPLES", 8)
    out, st = _run(eng, reqs, schedule_policy="auto")
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert set(st.projected_seconds) == set(CANDIDATES)


def test_probe_runs_first_and_its_outputs_are_the_real_ones(blend_engine):
    """Unfixed lengths (EOS may stop them): blendserve runs a probe first, estimates the others'
    lengths from it and reports the estimate and its error; the outputs equal fifo's and nothing
    is computed twice."""
    eng, vocab = blend_engine
    reqs = _mixed_requests(vocab, n_unfixed=20)
    ref, _ = _run(eng, reqs)
    out, st = _run(eng, reqs, schedule_policy="blendserve", output_len_sample_fraction=0.2)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert st.output_len_probe_samples == 4
    assert st.output_len_estimated_samples == 16
    assert st.output_len_realised_mean > 0 and st.output_len_error >= 0
    assert st.computed_prefill_tokens == st.optimal_prefill_tokens
    assert st.generated_tokens == sum(len(o.token_ids) for o in out)


def test_order_bound_is_below_every_policy_and_order_invariant():
    """`order_bound`: no policy's projected time is below it, and the work it counts (tokens,
    prefill pairs, KV read) is the same whatever the order (within 2 %), so fifo / bound is the
    most any order could gain."""
    from jaxserve.engine.simulate import order_bound

    reqs = workloads.preset("blend_mix3_clustered", vocab_size=CFG.vocab_size, scale=0.1)
    outs = [r["max_tokens"] for r in reqs]
    bounds = {}
    for pol in CANDIDATES:
        res = sim(from_requests(reqs), pol)
        bounds[pol] = order_bound(res, COSTS, budget=2048, max_rows=256, output_lens=outs)
        assert res.seconds >= bounds[pol] > 0, pol
        assert res.steps >= max(outs)
    assert max(bounds.values()) <= 1.02 * min(bounds.values()), bounds
