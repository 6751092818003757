"""Run by tests/test_data_parallel.py in a subprocess whose XLA_FLAGS give 8 CPU devices (set
before JAX starts, so the rest of the suite keeps one): the same workloads through `LLM` with
data_parallel_size 1, 2 and 4, results as JSON on stdout's last line.

    python -m tests.dp_worker MODEL_DIR
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from jaxserve import LLM, SamplingParams  # noqa: E402

# One page-table width (page_bucket_growth=1): the same 2 programs for every part of the batch,
# so each device compiles once for all the runs here (each new device is a full compile on CPU).
TINY = dict(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128, num_pages=64,
            page_size=8, attention_impl="reference", page_bucket_growth=1)
V = 384


def workloads(rng):
    """groups: shared-prefix groups plus ungrouped requests (a few sampled, unseeded);
    system: one prompt shared by everything, which balance must split."""
    groups, members = [], []
    for g in range(6):
        # Groups start at tokens >= 100 and ungrouped prompts below: nothing shared by chance.
        prefix = [int(rng.integers(100, V))] + rng.integers(0, V, int(rng.integers(24, 48))).tolist()
        for _ in range(4):
            groups.append(prefix + rng.integers(0, V, int(rng.integers(3, 10))).tolist())
            members.append(g)
    for i in range(12):
        groups.append([i] + rng.integers(0, V, int(rng.integers(2, 40))).tolist())
        members.append(-1)
    g_params = [dict(max_tokens=int(rng.integers(1, 10)), temperature=0.0) for _ in groups]
    for j in (len(groups) - 1, len(groups) - 2, 3):
        g_params[j] = dict(max_tokens=6, temperature=0.9)
    system = rng.integers(0, V, 40).tolist()
    sys_prompts = [system + rng.integers(0, V, int(rng.integers(2, 8))).tolist() for _ in range(10)]
    s_params = [dict(max_tokens=int(rng.integers(2, 8)), temperature=0.0) for _ in sys_prompts]
    return dict(groups=(groups, g_params, members), system=(sys_prompts, s_params, None))


def main(path: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    loads = workloads(np.random.default_rng(0))
    out: dict = {"members": loads["groups"][2], "system_len": 40}
    for dp in (1, 2, 4):
        llm = LLM(path, data_parallel_size=dp, **TINY)
        res = {}
        for name, (prompts, params, _) in loads.items():
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                [SamplingParams(**sp) for sp in params], use_tqdm=False)
            st = llm.stats()
            rec = dict(tokens=[o.token_ids for o in outs], ids=[o.request_id for o in outs],
                       stats={k: v for k, v in st.items() if isinstance(v, (int, float, list))})
            if dp > 1:
                eng = llm.engine
                rec["parts"] = eng.last_partition.parts
                rec["replica_optimal"] = [r.last_stats.optimal_prefill_tokens
                                          for r in eng.replicas]
                rec["param_devices"] = [sorted(str(d) for x in jax.tree.leaves(r.runner.params)
                                               for d in x.devices()) for r in eng.replicas]
                rec["kv_devices"] = [str(next(iter(r.runner.k_cache.devices())))
                                     for r in eng.replicas]
            res[name] = rec
        out[str(dp)] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
