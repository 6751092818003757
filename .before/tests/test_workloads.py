"""Synthetic workloads have the lengths and sharing their family promises, deterministically."""
from __future__ import annotations

import pytest

from jaxserve import workloads
from jaxserve.scheduler.prefix_tree import build_prefix_tree


@pytest.mark.parametrize("name", list(workloads.PRESETS))
def test_presets_have_promised_shape(name):
    spec = workloads.PRESETS[name]
    reqs = workloads.preset(name, vocab_size=50000, scale=1 / 64, seed=1)
    assert reqs == workloads.preset(name, vocab_size=50000, scale=1 / 64, seed=1)   # deterministic
    assert all(r["ignore_eos"] and all(256 <= t < 50000 for t in r["prompt_token_ids"]) for r in reqs)
    tree = build_prefix_tree([r["prompt_token_ids"] for r in reqs])
    lens = [len(r["prompt_token_ids"]) for r in reqs]
    if spec["family"] == "nosharing":
        assert tree.optimal_prefill_tokens == sum(lens) and set(lens) == {spec["input_len"]}
    elif spec["family"] == "groups":
        g = len(reqs) // spec["share"]
        assert set(lens) == {spec["shared_len"] + spec["unique_len"]}
        assert tree.optimal_prefill_tokens == g * spec["shared_len"] + len(reqs) * spec["unique_len"]
    elif spec["family"] == "document":
        d = len(reqs) // spec["questions"]
        assert tree.optimal_prefill_tokens == d * spec["doc_len"] + len(reqs) * spec["question_len"]
    elif spec["family"] == "system":
        assert tree.optimal_prefill_tokens == spec["system_len"] + len(reqs) * spec["unique_len"]
    elif spec["family"] == "mixed":
        assert {(l, r["max_tokens"]) for l, r in zip(lens, reqs)} == {
            (spec["short_in"], spec["long_out"]), (spec["long_in"], spec["short_out"])}


def test_hf_peer_batches_cap_rows_and_padded_tokens():
    """The HF peer's batches: at most --hf_batch_size rows and, with a token cap, at most that many
    padded tokens, so the mixed workload's 2048-token prompts run in small batches (batch 128 of
    them ran out of memory) while its short prompts keep batch 128."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "benchmark.py")
    spec = importlib.util.spec_from_file_location("benchmark_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    short = {"prompt_token_ids": [1] * 64, "max_tokens": 512}
    long = {"prompt_token_ids": [1] * 2048, "max_tokens": 16}
    reqs = [short] * 130 + [long] * 80
    assert [len(b) for b in mod.hf_batches(reqs, 128, 0)] == [128, 82]
    got = mod.hf_batches(reqs, 128, 74000)
    # 128 short (73,728 tokens); 2 short + 26 long padded to 2560 (71,680); then 35 long (72,240)
    assert [len(b) for b in got] == [128, 28, 35, 19]
    assert [r for b in got for r in b] == reqs
    for b in got:
        width = max(len(r["prompt_token_ids"]) for r in b) + max(r["max_tokens"] for r in b)
        assert len(b) <= 128 and (len(b) == 1 or len(b) * width <= 74000)
