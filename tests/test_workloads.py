"""Synthetic workloads have the lengths and sharing their family promises, deterministically."""
from __future__ import annotations

import numpy as np
import pytest

from jaxserve.tools import workloads
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
    elif spec["family"] == "ragged":
        assert tree.optimal_prefill_tokens == sum(lens)      # nothing shared
        outs = [r["max_tokens"] for r in reqs]
        assert len(set(lens)) > len(reqs) // 4 and len(set(outs)) > len(reqs) // 4   # spread
        assert max(lens) <= spec["max_in"] and 1 <= min(outs) and max(outs) <= spec["max_out"]
        big = workloads.preset(name, vocab_size=50000, scale=1, seed=1)
        med_in = sorted(len(r["prompt_token_ids"]) for r in big)[len(big) // 2]
        med_out = sorted(r["max_tokens"] for r in big)[len(big) // 2]
        assert abs(med_in / spec["in_median"] - 1) < 0.15 and abs(med_out / spec["out_median"] - 1) < 0.15
    elif spec["family"] == "mixed":
        assert {(l, r["max_tokens"]) for l, r in zip(lens, reqs)} == {
            (spec["short_in"], spec["long_out"]), (spec["long_in"], spec["short_out"])}


def _benchmark_module():
    """scripts/benchmark.py as a module, loaded once (its absl flags can be defined only once)."""
    import importlib.util
    import os
    import sys

    if "benchmark_script" not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "scripts", "benchmark.py")
        spec = importlib.util.spec_from_file_location("benchmark_script", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["benchmark_script"] = mod
    return sys.modules["benchmark_script"]


def test_hf_peer_record_with_ceilings(tmp_path, monkeypatch):
    """The HF peer run with the ceilings of a file (as a device call runs it beside jaxserve)
    writes its record: the ceilings on record, no floor (it has no step sizes; computing one
    raised a TypeError after the run and lost the record)."""
    import json

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from jaxserve.weights import presets

    mod = _benchmark_module()
    from tests import tiny_models

    # The tiny test models' shapes as an HF config dict (what a preset holds).
    tiny = dict(tiny_models.KINDS["llama3"]().to_dict(), architectures=["LlamaForCausalLM"])
    monkeypatch.setattr(presets, "preset_dict", lambda name: dict(tiny))
    monkeypatch.setattr(presets, "is_preset", lambda name: True)
    monkeypatch.setattr(presets, "load_preset", lambda name: presets.ModelConfig.from_hf_dict(
        dict(tiny), source="test"))
    work = tmp_path / "w.jsonl"
    rng = np.random.default_rng(0)
    with open(work, "w") as f:
        for n in (5, 9, 7):
            f.write(json.dumps({"prompt_token_ids": rng.integers(1, tiny_models.VOCAB, n).tolist(),
                                "max_tokens": 3}) + "\n")
    ceil = tmp_path / "ceilings.json"
    ceil.write_text(json.dumps({"one_program_copy_bytes_per_s": 4.1e12,
                                "one_program_bf16_flops": 8.0e14}))
    argv = ["benchmark.py", "--engine=hf", "--model=tiny", f"--workload={work}",
            f"--ceilings={ceil}", f"--results_dir={tmp_path}", "--hf_batch_size=2"]
    mod.FLAGS.unparse_flags()
    mod.FLAGS(argv)
    try:
        mod.main([])
    finally:
        mod.FLAGS.unparse_flags()
    rec = json.loads((tmp_path / "e2e_w_tiny_hf.json").read_text())
    assert rec["engine"] == "hf" and rec["num_requests"] == 3 and rec["output_tokens"] == 9
    assert rec["matmul_flops_measured"] == 8.0e14 and rec["hbm_bandwidth_measured"] == 4.1e12
    assert rec["floor_fraction"] is None and rec["run_seconds"] > 0


def test_jaxserve_record_holds_both_floors(tmp_path, monkeypatch):
    """A jaxserve run with the ceilings of a file records the floor and the serial floor (the
    matmuls and attention one after another), which is never below it, and the fractions of
    the run they are."""
    import json

    from jaxserve.weights import presets

    mod = _benchmark_module()
    from tests import tiny_models

    tiny = dict(tiny_models.KINDS["llama3"]().to_dict(), architectures=["LlamaForCausalLM"])
    monkeypatch.setattr(presets, "preset_dict", lambda name: dict(tiny))
    monkeypatch.setattr(presets, "is_preset", lambda name: True)
    monkeypatch.setattr(presets, "load_preset", lambda name: presets.ModelConfig.from_hf_dict(
        dict(tiny), source="test"))
    work = tmp_path / "w.jsonl"
    rng = np.random.default_rng(1)
    shared = rng.integers(1, tiny_models.VOCAB, 32).tolist()
    with open(work, "w") as f:
        for n in (5, 9, 7):
            f.write(json.dumps({"prompt_token_ids": shared + rng.integers(
                1, tiny_models.VOCAB, n).tolist(), "max_tokens": 4}) + "\n")
    ceil = tmp_path / "ceilings.json"
    ceil.write_text(json.dumps({"one_program_copy_bytes_per_s": 4.1e12,
                                "one_program_bf16_flops": 8.0e14}))
    argv = ["benchmark.py", "--engine=jaxserve", "--model=tiny", f"--workload={work}",
            f"--ceilings={ceil}", f"--results_dir={tmp_path}", "--max_model_len=64",
            "--compilation_cache_dir=off"]
    mod.FLAGS.unparse_flags()
    mod.FLAGS(argv)
    try:
        mod.main([])
    finally:
        mod.FLAGS.unparse_flags()
    rec = json.loads((tmp_path / "e2e_w_tiny_jaxserve.json").read_text())
    assert rec["floor_seconds"] > 0
    assert rec["serial_floor_seconds"] >= rec["floor_seconds"]
    assert rec["floor_fraction"] == pytest.approx(rec["floor_seconds"] / rec["run_seconds"])
    assert rec["serial_floor_fraction"] == pytest.approx(
        rec["serial_floor_seconds"] / rec["run_seconds"])


def test_hf_peer_batches_cap_rows_and_padded_tokens():
    """The HF peer's batches: at most --hf_batch_size rows and, with a token cap, at most that many
    padded tokens, so the mixed workload's 2048-token prompts run in small batches (batch 128 of
    them ran out of memory) while its short prompts keep batch 128."""
    mod = _benchmark_module()
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
