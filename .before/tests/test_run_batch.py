"""scripts/run_batch.py end to end: one output line per input line, in order; every kind of bad
line costs only itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxserve.io.jsonl import parse_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


BAD_LINES = {
    "malformed JSON": '{"id": "x", "prompt_token_ids": [1, 2',
    "expected a JSON object": '[1, 2, 3]',
    "unknown field 'temprature'": '{"id": "u", "prompt_token_ids": [1, 2], "temprature": 0.5}',
    "field 'max_tokens': must be >= 1": '{"id": "m", "prompt_token_ids": [1], "max_tokens": -3}',
    "field 'top_p': must be in (0, 1]": '{"id": "p", "prompt_token_ids": [1], "top_p": 2}',
    "field 'temperature': must be a number": '{"id": "t", "prompt_token_ids": [1], "temperature": "hot"}',
    "empty prompt": '{"id": "e", "prompt_token_ids": []}',
    "max_model_len": json.dumps({"id": "l", "prompt_token_ids": list(range(1, 101))}),
    "needs exactly one of": '{"id": "b", "prompt": "hi", "prompt_token_ids": [1]}',
    "no tokenizer": '{"id": "n", "prompt": "text needs a tokenizer"}',
    "must be a list of integers": '{"id": "i", "prompt_token_ids": [1, "two"]}',
    "outside the vocabulary": '{"id": "v", "prompt_token_ids": [1, 99999]}',
    "field 'priority' must be an integer": '{"id": "r", "prompt_token_ids": [1], "priority": "high"}',
    "field 'logprobs': must be in [0, 20]": '{"id": "lp", "prompt_token_ids": [1], "logprobs": 21}',
    "field 'repetition_penalty': must be > 0": '{"id": "rp", "prompt_token_ids": [1], "repetition_penalty": 0}',
}


def test_bad_lines_cost_only_themselves(tiny_models, tmp_path):
    path, hf = tiny_models["llama3"]
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 384, int(rng.integers(2, 40))).tolist() for _ in range(6)]
    lines, expect = [], []
    bad = list(BAD_LINES.items())
    for i in range(max(len(good), len(bad))):
        if i < len(good):
            lines.append(json.dumps({"id": f"g{i}", "prompt_token_ids": good[i], "max_tokens": 5}))
            expect.append(("ok", good[i]))
        if i < len(bad):
            lines.append(bad[i][1])
            expect.append(("error", bad[i][0]))
    lines.insert(3, "")   # blank lines are skipped, not records
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), f"--model={path}",
         f"--input={inp}", f"--output={out}", "--max_num_batched_tokens=32", "--max_num_seqs=8",
         "--max_model_len=64", "--page_size=8", "--num_pages=64", "--use_tqdm=false",
         "--attention_impl=reference", f"--plot={tmp_path / 'run.png'}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run.png").stat().st_size > 1000   # throughput / token fill plot
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == len(expect)
    line_of = [i + 1 for i, x in enumerate(lines) if x.strip()]
    for rec, (kind, what), line_no in zip(recs, expect, line_of):
        if kind == "ok":
            assert rec["finish_reason"] == "length" and rec["error"] is None
            assert rec["token_ids"] == greedy(hf, what, 5)
        else:
            assert rec["finish_reason"] == "error"
            assert what in rec["error"], (what, rec["error"])
            assert f"line {line_no}" in rec["error"], rec["error"]


def test_missing_input_file_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"),
         f"--input={tmp_path / 'nope.jsonl'}", f"--output={tmp_path / 'o.jsonl'}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "input file not found" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("text,field", [('{"prompt": "a", "seed": 1.5}', "seed"),
                                        ('{"prompt": "a", "stop_token_ids": "x"}', "stop_token_ids"),
                                        ('{"prompt": "a", "min_tokens": 5, "max_tokens": 2}', "min_tokens"),
                                        ('{"prompt": "a", "presence_penalty": 3}', "presence_penalty"),
                                        ('{"prompt": "a", "frequency_penalty": "x"}', "frequency_penalty"),
                                        ('{"prompt": "a", "prompt_logprobs": -1}', "prompt_logprobs"),
                                        ('{"prompt": "a", "logprobs": true}', "logprobs")])
def test_parse_line_names_the_field(text, field):
    item = parse_line(7, text, {})
    assert item.error.startswith("line 7:") and f"'{field}'" in item.error


def test_sigkill_mid_run_then_resume_gives_every_result_once(tiny_models, tmp_path):
    """Issue #7, acceptance 2: kill -9 the batch job mid-run, run the same command again: the final
    output has every id exactly once and equals an uninterrupted greedy run."""
    import signal
    import time

    path, hf = tiny_models["tied"]
    rng = np.random.default_rng(4)
    lines = [json.dumps({"id": f"q{i}", "prompt_token_ids": rng.integers(0, 384, int(rng.integers(2, 60))).tolist(),
                         "max_tokens": int(rng.integers(1, 40))}) for i in range(40)]
    lines[7] = '{"id": "bad", "prompt_token_ids": [1], "top_p": 7}'   # an error record too
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    # One request per step keeps the run long enough to kill it in the middle.
    args = [sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), f"--model={path}",
            f"--input={inp}", "--max_num_batched_tokens=16", "--max_num_seqs=2", "--max_model_len=128",
            "--page_size=8", "--num_pages=64", "--use_tqdm=false", "--attention_impl=reference"]
    full = tmp_path / "full.jsonl"
    subprocess.run(args + [f"--output={full}"], check=True, capture_output=True, timeout=600)

    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen(args + [f"--output={out}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and len(partial.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(partial.read_text().splitlines())
    assert 10 <= n_done < 40 and not out.exists()
    # A torn last line, as a kill in the middle of a write leaves it.
    with open(partial, "a") as f:
        f.write('{"_key": "12:q12", "text": "tru')
    res = subprocess.run(args + [f"--output={out}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming: {n_done} of 40" in res.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [json.loads(x)["id"] for x in lines]
    assert recs == [json.loads(x) for x in full.read_text().splitlines()]
    assert not partial.exists()


def _stats_from_stdout(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_dry_run_projects_the_same_sharing_as_the_real_run(tiny_models, tmp_path):
    """Issue #7, acceptance 3: the dry run's optimal reuse equals what the planner of a real run
    reports (and computes), without touching the weights."""
    from jaxserve import workloads

    path, _ = tiny_models["qwen2"]
    reqs = workloads.generate("groups", vocab_size=384, seed=2, num_groups=3, share=4,
                              shared_len=30, unique_len=6, output_len=3)
    reqs += workloads.generate("system", vocab_size=384, seed=3, num_requests=5, system_len=20,
                               unique_len=4, output_len=2)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs) + "{broken\n")
    common = [sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), f"--model={path}",
              f"--input={inp}", f"--output={tmp_path / 'o.jsonl'}", "--use_tqdm=false",
              "--max_num_batched_tokens=32", "--max_num_seqs=8", "--max_model_len=64",
              "--page_size=8", "--num_pages=128", "--attention_impl=reference"]
    dry = subprocess.run(common + ["--dry_run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "optimal reuse ratio" in dry.stdout and "projected time on h100" in dry.stdout
    assert not (tmp_path / "o.jsonl").exists()
    d = json.loads((tmp_path / "o.jsonl.dryrun.json").read_text())
    assert d["num_valid"] == len(reqs) and d["num_errors"] == 1
    real = subprocess.run(common, capture_output=True, text=True, timeout=600)
    assert real.returncode == 0, real.stderr[-2000:]
    st = _stats_from_stdout(real.stdout)
    assert d["optimal_prefill_tokens"] == st["optimal_prefill_tokens"] == st["computed_prefill_tokens"]
    assert d["prompt_tokens"] == st["prompt_tokens"]
    assert abs(d["optimal_reuse_ratio"] - st["reuse_ratio"]) < 1e-4 and d["optimal_reuse_ratio"] > 0.5  # printed rounded
    assert d["num_groups"] == st["num_groups"]


def test_dry_run_on_the_examples_prints_the_table(tmp_path):
    from tests.helpers_weights import smollm2_gguf

    smollm2_gguf()   # skips when the default model is not installed
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), "--dry_run",
                          f"--output={tmp_path / 'x.jsonl'}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads((tmp_path / "x.jsonl.dryrun.json").read_text())
    assert d["num_requests"] == 18 and d["optimal_reuse_ratio"] > 0.5   # long shared instructions
    for row in ("prompt tokens", "optimal reuse ratio", "shared prefixes / groups",
                "KV if all ran at once", "projected time on h100"):
        assert row in res.stdout


def test_strict_refuses_the_file_before_any_compute(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt_token_ids": [1, 2]}\n{"id": 2, "prompt_token_ids": [1], "top_p": 3}\n')
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), "--strict",
                          "--model=/nonexistent/model/dir", f"--input={inp}",
                          f"--output={tmp_path / 'o.jsonl'}"], capture_output=True, text=True, timeout=300)
    # The model is never loaded (its path does not even exist): the file is refused first.
    assert res.returncode == 3
    assert "line 2: field 'top_p'" in res.stderr and "nothing was run" in res.stderr
    assert not (tmp_path / "o.jsonl").exists()
