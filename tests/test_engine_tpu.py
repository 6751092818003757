"""The whole engine through the TPU kernels (`attention_impl="pallas_tpu"`, TPU interpret mode on
CPU): greedy outputs of the tiny Llama, Mistral and Qwen2 models equal the reference backend's and
transformers', with global prefix sharing and shared-prefix attention on (groups read through the
TPU prefix kernel), chunked prefill and decode."""
from __future__ import annotations

import numpy as np
import pytest

import pallas_kernels
from tests.test_engine import hf_greedy, make_engine
from tests.test_prefix_sharing import groups_workload


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2"])
def test_engine_pallas_tpu_equals_reference_and_transformers(kind, tiny_models, monkeypatch):
    path, hf = tiny_models[kind]
    reqs = groups_workload(np.random.default_rng(5), n_groups=2, share=3, shared_len=21,
                           unique_len=7, out_len=5)
    grouped = []
    attention = pallas_kernels.IMPLEMENTATIONS["pallas_tpu"].attention

    def spy(q, k, v, md, **kw):     # the prefix kernel really runs: groups reach the kernel
        grouped.append(md.groups is not None)
        return attention(q, k, v, md, **kw)

    monkeypatch.setitem(pallas_kernels.IMPLEMENTATIONS, "pallas_tpu", pallas_kernels.Backend(
        spy, supports_groups=True,
        host_prepare=pallas_kernels.IMPLEMENTATIONS["pallas_tpu"].host_prepare))
    kw = dict(max_num_batched_tokens=32, max_num_seqs=8, num_pages=120,
              compilation_cache_dir="off")
    tpu = make_engine(path, attention_impl="pallas_tpu", **kw)
    out_t = tpu.run(reqs)
    assert any(grouped) and tpu.last_stats.num_shared_prefixes >= 2
    assert tpu.last_stats.computed_prefill_tokens == tpu.last_stats.optimal_prefill_tokens
    out_r = make_engine(path, **kw).run(reqs)
    for r, a, b in zip(reqs, out_t, out_r):
        assert a.token_ids == b.token_ids, r.request_id
        assert a.token_ids == hf_greedy(hf, r), r.request_id
