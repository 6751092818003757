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
