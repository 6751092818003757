"""Issue #5: global prefix sharing, admission control and ordering on synthetic workloads."""
from __future__ import annotations

import random

import numpy as np
import pytest

from jaxserve.engine import Request
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler.prefix_tree import build_prefix_tree
from tests.test_engine import make_engine

V = 384


def groups_workload(rng, n_groups, share, shared_len, unique_len, out_len):
    reqs = []
    for g in range(n_groups):
        prefix = rng.integers(0, V, shared_len).tolist()
        for k in range(share):
            u = int(rng.integers(max(1, unique_len // 2), unique_len + 1))
            reqs.append(Request(f"g{g}m{k}", prefix + rng.integers(0, V, u).tolist(),
                                SamplingParams(max_tokens=int(rng.integers(1, out_len + 1)),
                                               temperature=0.0)))
    return reqs


def system_doc_workload(rng, n_docs, questions, sys_len, doc_len, q_len, out_len):
    system = rng.integers(0, V, sys_len).tolist()
    reqs = []
    for d in range(n_docs):
        doc = rng.integers(0, V, doc_len).tolist()
        for k in range(questions):
            reqs.append(Request(f"d{d}q{k}", system + doc + rng.integers(0, V, q_len).tolist(),
                                SamplingParams(max_tokens=out_len, temperature=0.0)))
    return reqs


def no_sharing_workload(rng, n):
    # Distinct first tokens: nothing is shared, not even by chance.
    return [Request(f"n{i}", [i] + rng.integers(0, V, int(rng.integers(1, 40))).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=0.0))
            for i in range(n)]


def brute_optimal(prompts):
    """Tokens an engine must compute when every prefix (but a request's last token) shared by 2+
    prompts is computed once: counted from the set of all prefixes, independently of the tree."""
    from collections import Counter

    cnt = Counter(tuple(p[:k]) for p in prompts for k in range(1, len(p)))
    return sum(1 + sum(cnt[tuple(p[:k])] < 2 for k in range(1, len(p))) for p in prompts) + \
        sum(v >= 2 for v in cnt.values())


def test_prefix_tree_counts_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        bases = [[rng.randrange(3) for _ in range(rng.randrange(0, 7))] for _ in range(3)]
        prompts = [rng.choice(bases) + [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
                   for _ in range(rng.randrange(1, 10))]
        tree = build_prefix_tree(prompts)
        assert tree.optimal_prefill_tokens == brute_optimal(prompts), prompts
        for i, node in enumerate(tree.leaf_node):
            if node is not None:   # the node's tokens really are this prompt's prefix
                assert prompts[tree.shared[tree.shared.index(node)].first][:node.depth] == prompts[i][:node.depth]


WORKLOADS = {
    "groups": lambda rng: groups_workload(rng, n_groups=5, share=4, shared_len=45, unique_len=12,
                                          out_len=10),
    "system_docs": lambda rng: system_doc_workload(rng, n_docs=3, questions=4, sys_len=21,
                                                   doc_len=30, q_len=7, out_len=6),
    "none": lambda rng: no_sharing_workload(rng, 14),
}


@pytest.fixture(scope="module")
def engines(tiny_models):
    path, _ = tiny_models["llama3"]
    common = dict(max_num_batched_tokens=48, max_num_seqs=16, num_pages=300)
    return {
        "all_on": make_engine(path, **common),
        "all_off": make_engine(path, global_prefix_sharing=False, shared_prefix_attention=False,
                               schedule_policy="fifo", admission_control=False, **common),
        "blendserve": make_engine(path, schedule_policy="blendserve", **common),
    }


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_sharing_is_optimal_and_changes_no_output(name, engines):
    reqs = WORKLOADS[name](np.random.default_rng(3))
    on = engines["all_on"].run(reqs)
    st = engines["all_on"].last_stats
    prompts = [r.prompt_ids for r in reqs]
    assert st.optimal_prefill_tokens == brute_optimal(prompts)
    assert st.computed_prefill_tokens == st.optimal_prefill_tokens
    if name == "none":
        assert st.computed_prefill_tokens == st.prompt_tokens and st.num_shared_prefixes == 0
    else:
        assert st.computed_prefill_tokens < 0.6 * st.prompt_tokens
    if name == "system_docs":
        assert build_prefix_tree(prompts).depth_levels() == 2   # system, then per-document
    off = engines["all_off"].run(reqs)
    assert engines["all_off"].last_stats.computed_prefill_tokens == st.prompt_tokens
    blend = engines["blendserve"].run(reqs)
    assert engines["blendserve"].last_stats.computed_prefill_tokens == st.optimal_prefill_tokens
    for a, b, c in zip(on, off, blend):
        assert a.token_ids == b.token_ids == c.token_ids, a.request_id


def test_admission_control_avoids_preemption_in_a_small_pool(tiny_models):
    path, _ = tiny_models["llama3"]
    reqs = groups_workload(np.random.default_rng(5), n_groups=6, share=4, shared_len=40,
                           unique_len=10, out_len=24)
    # A group needs 40 shared + 4 x (10 + 24) own tokens ~ 20 pages of 8: 40 pages hold about two.
    ref = make_engine(path, num_pages=400, global_prefix_sharing=False).run(reqs)
    small = make_engine(path, num_pages=41)
    out = small.run(reqs)
    st = small.last_stats
    assert st.preemptions == 0
    assert st.peak_kv_pages <= 40
    assert st.computed_prefill_tokens == st.optimal_prefill_tokens
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    # Without admission control the same pool must preempt (and still be right).
    loose = make_engine(path, num_pages=41, admission_control=False)
    out2 = loose.run(reqs)
    assert loose.last_stats.preemptions > 0
    assert [o.token_ids for o in out2] == [o.token_ids for o in ref]


def test_input_order_does_not_change_prefill_work(engines):
    reqs = groups_workload(np.random.default_rng(9), n_groups=4, share=5, shared_len=30,
                           unique_len=8, out_len=5)
    shuffled = list(reqs)
    random.Random(1).shuffle(shuffled)
    eng = engines["all_on"]
    out_sorted = {o.request_id: o.token_ids for o in eng.run(reqs)}
    n_sorted = eng.last_stats.computed_prefill_tokens
    out_shuf = {o.request_id: o.token_ids for o in eng.run(shuffled)}
    assert eng.last_stats.computed_prefill_tokens == n_sorted == eng.last_stats.optimal_prefill_tokens
    assert out_sorted == out_shuf


@pytest.mark.parametrize("cascade,fused", [(False, 1), (True, 1), (True, 4)])
def test_pallas_kernel_path_matches_reference(cascade, fused, tiny_models, engines, monkeypatch):
    """The engine through the GPU kernel (interpret mode on CPU): with host-built shared-prefix
    work lists (cascade) or the device-built plain list, greedy outputs equal the reference's.
    fused=4: decode steps run in fused blocks that advance the first step's shared-prefix list on
    device (members finish inside blocks: output lengths 1-6). This checks the wiring (blocks run
    with groups, through `advance_work_items`); the tiny model's greedy tokens barely depend on
    the newest keys, so a wrong advance is caught numerically by
    `test_pallas_cascade_list_advanced_over_fused_decode_steps` in test_kernels.py."""
    import pallas_kernels
    from pallas_kernels.gpu import cascade as gpu_cascade, work_items

    path, _ = tiny_models["qwen2"]
    reqs = groups_workload(np.random.default_rng(13), n_groups=3, share=4, shared_len=37,
                           unique_len=9, out_len=6)
    advanced = []
    advance = work_items.advance_work_items
    monkeypatch.setattr(work_items, "advance_work_items",
                        lambda *a: advanced.append(1) or advance(*a))
    eng = make_engine(path, attention_impl="pallas_gpu_interpret", shared_prefix_attention=cascade,
                      max_num_batched_tokens=48, max_num_seqs=16, num_pages=300,
                      fused_decode_steps=fused)
    assert pallas_kernels.uses_groups(eng.attention) == cascade
    ref = make_engine(path, max_num_batched_tokens=48, max_num_seqs=16, num_pages=300)

    grouped_rows = []       # (rows in a group, built for a fused block)
    build = gpu_cascade.build_cascade_work
    in_block = []

    def spy(md, groups, **kw):
        if groups is not None:      # the runner's compile-time layout (an empty plan) has no rows
            grouped_rows.append((int((groups.seq_group >= 0).sum()), bool(in_block and in_block[-1])))
        return build(md, groups, **kw)

    monkeypatch.setattr(gpu_cascade, "build_cascade_work", spy)
    # The host builds a step's list when the step is dispatched: note whether it is a block's.
    from tests.step_spy import watch_results

    watch_results(eng.runner, lambda plan, res: None,
                  on_dispatch=lambda plan: in_block.append(plan.decode_steps > 1))
    out = eng.run(reqs)
    if cascade:   # steps really ran with several members reading one prefix
        assert max(n for n, _ in grouped_rows) >= 4
    else:
        assert grouped_rows == []
    if fused > 1:   # ... and so did fused blocks, through the on-device advance of the list
        assert eng.last_stats.fused_blocks >= 1
        assert max(n for n, blk in grouped_rows if blk) >= 4
        assert advanced
    assert eng.last_stats.computed_prefill_tokens == eng.last_stats.optimal_prefill_tokens
    assert [o.token_ids for o in out] == [o.token_ids for o in ref.run(reqs)]


def test_batch_without_shared_pages_runs_device_built_lists(tiny_models, monkeypatch):
    """A batch in which no two prompts share a page cannot have a shared-prefix group, so its
    programs take the device-built work list (decode items of 16 rows, where the host-built
    list's one row block size is 64 for the groups' sake) and the host builds none; a batch with
    shared pages on the same engine gets programs with host-built lists. Greedy outputs equal the
    reference's either way."""
    from pallas_kernels.gpu import cascade as gpu_cascade, kernel, work_items

    path, _ = tiny_models["qwen2"]
    eng = make_engine(path, attention_impl="pallas_gpu_interpret", shared_prefix_attention=True,
                      max_num_batched_tokens=48, max_num_seqs=16, num_pages=300)
    ref = make_engine(path, max_num_batched_tokens=48, max_num_seqs=16, num_pages=300)
    host_built, device_built, block_rows = [], [], []
    build, dev, partials = (gpu_cascade.build_cascade_work, work_items.device_work_items,
                            kernel.attention_partials)
    monkeypatch.setattr(gpu_cascade, "build_cascade_work",
                        lambda *a, **kw: host_built.append(1) or build(*a, **kw))
    monkeypatch.setattr(work_items, "device_work_items",
                        lambda *a, **kw: device_built.append(1) or dev(*a, **kw))
    monkeypatch.setattr(kernel, "attention_partials",
                        lambda q2, kc, vc, work, *a, **kw: block_rows.append(
                            (kw.get("items") or work).rows.shape[1])
                        or partials(q2, kc, vc, work, *a, **kw))

    plain = no_sharing_workload(np.random.default_rng(5), 12)
    out = eng.run(plain)
    assert host_built == [] and device_built
    assert not any(k.features.groups for k in eng.runner.programs._compiled)
    assert min(block_rows) == 16          # decode steps ran 16-row items
    assert [o.token_ids for o in out] == [o.token_ids for o in ref.run(plain)]

    shared = groups_workload(np.random.default_rng(6), n_groups=2, share=3, shared_len=37,
                             unique_len=9, out_len=5)
    block_rows.clear()
    out = eng.run(shared)
    assert host_built                     # the shared batch's programs build host lists
    # with 64-row shared items and, in decode steps, a second list of 16-row own items
    assert {16, 64} <= set(block_rows)
    assert any(k.features.groups for k in eng.runner.programs._compiled)
    assert eng.last_stats.computed_prefill_tokens == eng.last_stats.optimal_prefill_tokens
    assert [o.token_ids for o in out] == [o.token_ids for o in ref.run(shared)]


def test_shared_block_rows_override(tiny_models, monkeypatch):
    """JAXSERVE_SHARED_BLOCK_ROWS sets the shared items' size (an A/B switch for the device):
    128-row items run and give the reference's greedy outputs; a bad value is refused."""
    from pallas_kernels.gpu import block_sizes, kernel

    monkeypatch.setenv("JAXSERVE_SHARED_BLOCK_ROWS", "128")
    path, _ = tiny_models["qwen2"]
    eng = make_engine(path, attention_impl="pallas_gpu_interpret", shared_prefix_attention=True,
                      max_num_batched_tokens=48, max_num_seqs=16, num_pages=300)
    ref = make_engine(path, max_num_batched_tokens=48, max_num_seqs=16, num_pages=300)
    rows, partials = [], kernel.attention_partials
    monkeypatch.setattr(kernel, "attention_partials",
                        lambda q2, kc, vc, work, *a, **kw: rows.append(
                            (kw.get("items") or work).rows.shape[1])
                        or partials(q2, kc, vc, work, *a, **kw))
    shared = groups_workload(np.random.default_rng(8), n_groups=2, share=4, shared_len=37,
                             unique_len=9, out_len=4)
    out = eng.run(shared)
    assert 128 in rows       # the shared items (own parts: 16 in decode, 64 in prefill buckets)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref.run(shared)]
    monkeypatch.setenv("JAXSERVE_SHARED_BLOCK_ROWS", "96")
    with pytest.raises(ValueError, match="power of two"):
        block_sizes.shared_block_rows()


def test_shares_a_page():
    from types import SimpleNamespace as S

    from jaxserve.engine.engine import shares_a_page
    assert not shares_a_page([S(prompt_ids=[1, 2, 3, 4]), S(prompt_ids=[1, 2, 3, 5])], 4)
    assert shares_a_page([S(prompt_ids=[1, 2, 3, 4, 9]), S(prompt_ids=[1, 2, 3, 4])], 4)
    assert not shares_a_page([S(prompt_ids=[1, 2, 3]), S(prompt_ids=[1, 2, 3])], 4)  # < a page
    assert shares_a_page([S(prompt_ids=[7] * 8)] * 2, 4)         # n copies of one prompt


@pytest.mark.parametrize("packed", ["1", "0"])
def test_packed_prefix_segments_in_the_engine(packed, tiny_models, monkeypatch):
    """Prefill steps hand their prefilling members' shared prefixes to one packed call (the jnp
    form of cuDNN's packed attention in interpret mode): steps really ran with members' rows in
    segments, and greedy outputs equal the reference's. JAXSERVE_PACKED_PREFIX=0 builds lists
    without segments, with the same outputs."""
    from pallas_kernels.gpu import cascade as gpu_cascade

    monkeypatch.setenv("JAXSERVE_PACKED_PREFIX", packed)
    path, _ = tiny_models["qwen2"]
    segs = []
    pack = gpu_cascade._packed_segments

    def spy(*a, **kw):
        out = pack(*a, **kw)
        segs.append(int(out[1].sum()))        # query tokens the step's segments took
        return out

    monkeypatch.setattr(gpu_cascade, "_packed_segments", spy)
    eng = make_engine(path, attention_impl="pallas_gpu_interpret", shared_prefix_attention=True,
                      max_num_batched_tokens=64, max_num_seqs=16, num_pages=300)
    assert eng.attention.packed_prefix == (packed == "1")
    ref = make_engine(path, max_num_batched_tokens=64, max_num_seqs=16, num_pages=300)
    reqs = groups_workload(np.random.default_rng(21), n_groups=3, share=5, shared_len=40,
                           unique_len=12, out_len=5)
    out = eng.run(reqs)
    if packed == "1":
        assert max(segs) >= 2 * 4             # several members' tokens in one step's segments
    else:
        assert segs == []
    assert eng.last_stats.computed_prefill_tokens == eng.last_stats.optimal_prefill_tokens
    assert [o.token_ids for o in out] == [o.token_ids for o in ref.run(reqs)]
