"""scripts/run_batch.py end to end: one output line per input line, in order; every kind of bad
line costs only itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from jaxserve.io import Hashes, ResultsLog
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


SCRIPT = os.path.join(ROOT, "scripts", "run_batch.py")
SMALL = ["--max_num_batched_tokens=32", "--max_num_seqs=8", "--max_model_len=64", "--page_size=8",
         "--num_pages=64", "--use_tqdm=false", "--attention_impl=reference"]
# One request (or two) per step: long enough to stop the job in the middle.
SLOW = ["--max_num_batched_tokens=16", "--max_num_seqs=2", "--max_model_len=64", "--page_size=8",
        "--num_pages=64", "--use_tqdm=false", "--attention_impl=reference"]


def _cmd(model, inp, out, *extra):
    return [sys.executable, SCRIPT, f"--model={model}", f"--input={inp}", f"--output={out}", *extra]


def _oa(custom_id, body, url="/v1/completions"):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _chat(custom_id, content, **kw):
    return _oa(custom_id, {"messages": [{"role": "user", "content": content}], **kw},
               "/v1/chat/completions")


# Hostile but fair lines, each an error for itself alone (issue #19): what the error must say
# (naming the field where there is one) and the line's bytes.
HOSTILE_LINES = [
    # Strings UTF-8 cannot encode (lone surrogates), in each string field.
    ("field 'id' contains a lone surrogate", '{"id": "bad\\udc80id", "prompt_token_ids": [1]}'),
    ("field 'metadata.note' contains a lone surrogate",
     '{"id": "s1", "prompt_token_ids": [1], "metadata": {"note": "x\\udc80"}}'),
    ("field 'custom_id' contains a lone surrogate", _oa("c\udc80", {"prompt": [1, 2]})),
    ("field 'prompt' contains a lone surrogate", '{"id": "s2", "prompt": "p\\ud800"}'),
    ("field 'stop[0]' contains a lone surrogate", '{"id": "s3", "prompt_token_ids": [1], "stop": ["\\udfff"]}'),
    ("field 'messages[0].content' contains a lone surrogate",
     '{"id": "s4", "messages": [{"role": "user", "content": "\\udc80"}]}'),
    ("(a key)' contains a lone surrogate", '{"id": "s5", "prompt_token_ids": [1], "\\udc80": 1}'),
    ("field 'body.prompt' contains a lone surrogate", _oa("s6", {"prompt": "\udc80"})),
    # Integers past what the device holds (int32), seeds and priorities past 64 bits.
    ("field 'top_k': must be at most 2147483647", '{"id": "i1", "prompt_token_ids": [1], "top_k": 10000000000}'),
    ("field 'max_tokens': must be at most 2147483647", '{"id": "i2", "prompt_token_ids": [1], "max_tokens": 2147483648}'),
    ("field 'min_tokens': must be at most 2147483647", '{"id": "i3", "prompt_token_ids": [1], "min_tokens": 3000000000}'),
    ("field 'n': must be at most 2147483647", '{"id": "i4", "prompt_token_ids": [1], "n": 5000000000}'),
    ("field 'stop_token_ids': token ids must be at most", '{"id": "i5", "prompt_token_ids": [1], "stop_token_ids": [3000000000]}'),
    ("field 'prompt_token_ids[1]': token id 3000000000", '{"id": "i6", "prompt_token_ids": [1, 3000000000]}'),
    ("field 'logprobs': must be in [0, 20]", '{"id": "i7", "prompt_token_ids": [1], "logprobs": 3000000000}'),
    ("field 'prompt_logprobs': must be in [0, 20]", '{"id": "i8", "prompt_token_ids": [1], "prompt_logprobs": 3000000000}'),
    ("field 'seed': must fit in 64 bits", '{"id": "i9", "prompt_token_ids": [1], "seed": 18446744073709551616}'),
    ("field 'priority' must fit in 64 bits", '{"id": "i10", "prompt_token_ids": [1], "priority": -18446744073709551616}'),
    ("field 'body.top_k': must be at most 2147483647", _oa("i11", {"prompt": [1], "top_k": 10000000000})),
    ("field 'body.stop_token_ids': token ids must be at most", _oa("i12", {"prompt": [1], "stop_token_ids": [3000000000]})),
    # Past the vocabulary (384): known to the engine.
    ("field 'stop_token_ids': token id 384 is outside the vocabulary",
     '{"id": "v1", "prompt_token_ids": [1], "stop_token_ids": [5, 384]}'),
    ("prompt token id 384 is outside the vocabulary", _oa("v2", {"prompt": [384]})),
    # Parsing bounds.
    ("field 'seed': an integer of 5001 digits", '{"id": "p1", "prompt_token_ids": [1], "seed": 1' + "0" * 5000 + "}"),
    ("nested more than 64 levels deep", "[" * 100000),
    ("nested more than 64 levels deep", '{"id": "p2", "prompt_token_ids": [1], "metadata": ' + "[" * 70 + "]" * 70 + "}"),
    ("field 'temperature': 'NaN' is not JSON", '{"id": "p3", "prompt_token_ids": [1], "temperature": NaN}'),
    ("field 'metadata.v': the number 1e999 is out of range", '{"id": "p4", "prompt_token_ids": [1], "metadata": {"v": 1e999}}'),
    ("field 'temperature': is beyond the float32 range", '{"id": "p5", "prompt_token_ids": [1], "temperature": 1e39}'),
    # Bytes: invalid UTF-8, a NUL, a line longer than --max_line_bytes.
    ("invalid UTF-8 (byte 0xff", b'{"id": "b1", "prompt_token_ids": [1], "metadata": "\xff"}'),
    ("malformed JSON", b'{"id": "b2", "prompt_token_ids": [1]\x00}'),
    ("more than --max_line_bytes=150000", '{"id": "b3", "prompt_token_ids": [' + "1, " * 70000 + "1]}"),
    # Wrong types.
    ("field 'prompt_token_ids' must be a list of integers", '{"id": "w1", "prompt_token_ids": "1,2"}'),
    ("field 'n': must be an integer", '{"id": "w2", "prompt_token_ids": [1], "n": "2"}'),
    ("field 'stop_token_ids': must be a list", '{"id": "w3", "prompt_token_ids": [1], "stop_token_ids": {"a": 1}}'),
    ("field 'ignore_eos': must be true or false", '{"id": "w4", "prompt_token_ids": [1], "ignore_eos": "yes"}'),
    ("field 'messages' must be a non-empty list", '{"id": "w5", "messages": "hi"}'),
    ("field 'messages[0].content[0].type': content parts of type 'image_url' are not supported",
     '{"id": "w6", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}'),
    ("expected a JSON object, got str", '"hello"'),
    # OpenAI bodies.
    ("field 'body' must be an object", '{"custom_id": "o1", "method": "POST", "url": "/v1/completions", "body": "x"}'),
    ("field 'body.messages[0].content[1].type': content parts of type 'input_audio'",
     _chat("o2", [{"type": "text", "text": "a"}, {"type": "input_audio"}])),
    ("unknown field 'body.logit_bias'", _oa("o3", {"prompt": [1], "logit_bias": {"1": 5}})),
    ("field 'body.use_beam_search': is not supported", _oa("o4", {"prompt": [1], "use_beam_search": True})),
    ("field 'url'='/v1/embeddings'", '{"custom_id": "o5", "method": "POST", "url": "/v1/embeddings", "body": {}}'),
    ("field 'custom_id' must be a non-empty string", '{"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {"prompt": [1]}}'),
]
CORPUS_ARGS = ["--max_line_bytes=150000"]


def _corpus(seed=0, n_good=16):
    """(lines as bytes, [("ok", token ids, max_tokens) | ("openai", ids, max_tokens) |
    ("error", what)] per line): every kind of bad line between good ones."""
    rng = np.random.default_rng(seed)
    bad = [(what, line) for what, line in BAD_LINES.items()] + HOSTILE_LINES
    assert len(bad) >= 40
    good = []
    for i in range(n_good):
        ids = rng.integers(0, 384, int(rng.integers(2, 30))).tolist()
        mt = int(rng.integers(3, 12))
        if i == 3:   # an OpenAI line among the plain ones
            good.append((_oa(f"g{i}", {"prompt": ids, "max_tokens": mt, "temperature": 0}),
                         ("openai", ids, mt)))
        elif i % 4 == 2:   # sampled, without a seed: a resumed job must sample the same
            good.append((json.dumps({"id": f"g{i}", "prompt_token_ids": ids, "max_tokens": mt,
                                     "temperature": 1.0}), ("sampled", ids, mt)))
        else:
            good.append((json.dumps({"id": f"g{i}", "prompt_token_ids": ids, "max_tokens": mt}),
                         ("ok", ids, mt)))
    lines, expect = [], []
    for i in range(max(len(good), len(bad))):
        if i < len(good):
            lines.append(good[i][0])
            expect.append(good[i][1])
        if i < len(bad):
            lines.append(bad[i][1])
            expect.append(("error", bad[i][0]))
    lines.insert(3, "")   # blank lines are skipped, not records
    expect.insert(3, None)
    return [x if isinstance(x, bytes) else x.encode() for x in lines], expect


def _check_corpus_output(recs, lines, expect, hf):
    line_of = [i + 1 for i, x in enumerate(lines) if x.strip()]
    expect = [e for e in expect if e is not None]
    assert len(recs) == len(expect) == len(line_of)
    greedy_cache = {}
    for rec, exp, line_no in zip(recs, expect, line_of):
        if exp[0] == "ok":
            key = (tuple(exp[1]), exp[2])
            if key not in greedy_cache:
                greedy_cache[key] = greedy(hf, exp[1], exp[2])
        if exp[0] == "ok":
            assert rec["finish_reason"] == "length" and rec["error"] is None, rec
            assert rec["token_ids"] == greedy_cache[(tuple(exp[1]), exp[2])]
        elif exp[0] == "sampled":
            assert rec["finish_reason"] == "length" and len(rec["token_ids"]) == exp[2], rec
        elif exp[0] == "openai":
            assert rec["error"] is None and rec["response"]["status_code"] == 200
            assert rec["response"]["body"]["usage"]["completion_tokens"] == exp[2]
        elif "custom_id" in rec:
            msg = rec["error"]["message"]
            assert exp[1] in msg and f"line {line_no}:" in msg, (exp[1], msg)
        else:
            assert rec["finish_reason"] == "error"
            assert exp[1] in rec["error"], (exp[1], rec["error"])
            assert f"line {line_no}:" in rec["error"], rec["error"]


def _normalized(recs):
    """Records without the random ids of OpenAI responses (batch_req_..., cmpl-..., created)."""
    out = []
    for r in recs:
        r = json.loads(json.dumps(r))
        if "custom_id" in r:
            r.pop("id")
            if r.get("response"):
                r["response"].pop("request_id")
                for k in ("id", "created"):
                    r["response"]["body"].pop(k)
        out.append(r)
    return out


def _wait_for_records(proc, partial, n, timeout=300, unless=None):
    """Wait until `partial` holds `n` records (its header not counted), with the job still running
    (and, with `unless`, once those bytes are gone from it: the job has rewritten it)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        data = partial.read_bytes() if partial.exists() else b""
        if len(data.splitlines()) - 1 >= n and (unless is None or unless not in data):
            return
        time.sleep(0.02)
    raise AssertionError(f"the job ended (rc={proc.poll()}) before {partial} had {n} records")


def test_bad_lines_cost_only_themselves(tiny_models, tmp_path):
    """Issues #7 and #19: a corpus of every kind of bad line (45+ kinds) costs only those lines,
    before and after a SIGKILL and a resume; the output folder is created; a stale lock and
    another job's .partial (with --overwrite) do not stop a job."""
    path, hf = tiny_models["llama3"]
    lines, expect = _corpus()
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    n_bad = sum(1 for e in expect if e is not None and e[0] == "error")
    n_records = sum(1 for e in expect if e is not None)
    out_a = tmp_path / "new" / "sub" / "out.jsonl"   # the folder does not exist yet
    proc = subprocess.run(_cmd(path, inp, out_a, *SMALL, *CORPUS_ARGS, f"--plot={tmp_path / 'run.png'}"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "created the output folder" in proc.stdout
    assert (tmp_path / "run.png").stat().st_size > 1000   # throughput / token fill plot
    # The closing line counts the errors of both formats.
    assert f"wrote {n_records} results to {out_a} ({n_records - n_bad} ok, {n_bad} errors;" in proc.stdout
    recs_a = [json.loads(x) for x in out_a.read_text(encoding="utf-8").splitlines()]
    _check_corpus_output(recs_a, lines, expect, hf)

    # The same corpus, killed (SIGKILL) in the middle and resumed, gives the same records, each
    # line once. Its output folder holds a lock left by a dead job and another job's .partial.
    out = tmp_path / "b" / "out.jsonl"
    out.parent.mkdir()
    other = ResultsLog(str(out), {"input": "/elsewhere/in.jsonl", "model": "/elsewhere/model"})
    other.start({})
    other.append("1:x", Hashes("r", "m", "e"), {"id": "x"})
    other.close()
    refused = subprocess.run(_cmd(path, inp, out, *SLOW, *CORPUS_ARGS), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert "holds results of another job" in refused.stderr and "programs compiled" not in refused.stderr
    partial = tmp_path / "b" / "out.jsonl.partial"
    (tmp_path / "b" / "out.jsonl.lock").write_text(json.dumps({"pid": 999999999, "host": "gone"}))
    job = subprocess.Popen(_cmd(path, inp, out, *SLOW, *CORPUS_ARGS, "--overwrite"),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _wait_for_records(job, partial, n_bad + 4)   # error records come first, then results
    job.kill()
    stdout_b = job.communicate()[0]
    assert "took over a stale lock" in stdout_b and "pid 999999999" in stdout_b
    assert "discarded the earlier results" in stdout_b
    n_done = len(partial.read_bytes().splitlines()) - 1
    assert n_bad + 4 <= n_done < n_records and not out.exists()
    res = subprocess.run(_cmd(path, inp, out, *SLOW, *CORPUS_ARGS), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"took over a stale lock {out}.lock (left by pid {job.pid}" in res.stdout
    assert f"{n_done} of {n_records} results reused" in res.stdout
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert _normalized(recs) == _normalized(recs_a)
    assert not partial.exists() and not (tmp_path / "b" / "out.jsonl.lock").exists()


def test_strict_refuses_the_corpus_listing_every_bad_line(tiny_models, tmp_path):
    """Issue #19, acceptance 3: before any compute, exit 3, every bad line listed (those only the
    model's config can tell, such as the vocabulary, included)."""
    path, _ = tiny_models["llama3"]
    lines, expect = _corpus()
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    res = subprocess.run(_cmd(path, inp, tmp_path / "o.jsonl", *SMALL, *CORPUS_ARGS, "--strict"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-3000:]
    listed = [x for x in res.stderr.splitlines() if x.startswith("line ")]
    bad_lines = [i + 1 for i, e in enumerate(expect) if e is not None and e[0] == "error"]
    assert [int(x.split(":")[0].split()[1]) for x in listed] == bad_lines
    for x, e in zip(listed, [e for e in expect if e is not None and e[0] == "error"]):
        assert e[1] in x, (e[1], x)
    assert f"--strict: {len(bad_lines)} invalid lines" in res.stderr and "nothing was run" in res.stderr
    assert "programs compiled" not in res.stderr and not (tmp_path / "o.jsonl").exists()


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
        if partial.exists() and len(partial.read_text().splitlines()) >= 11:   # header + 10
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(partial.read_text().splitlines()) - 1   # its header is not a result
    assert 10 <= n_done < 40 and not out.exists()
    # A torn last line, as a kill in the middle of a write leaves it.
    with open(partial, "a") as f:
        f.write('{"_key": "12:q12", "text": "tru')
    res = subprocess.run(args + [f"--output={out}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{n_done} of 40 results reused" in res.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [json.loads(x)["id"] for x in lines]
    assert recs == [json.loads(x) for x in full.read_text().splitlines()]
    assert not partial.exists()


def _stats_from_stdout(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_dry_run_projects_the_same_sharing_as_the_real_run(tiny_models, tmp_path):
    """Issue #7, acceptance 3: the dry run's optimal reuse equals what the planner of a real run
    reports (and computes), without touching the weights."""
    from jaxserve.tools import workloads

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


_ENOSPC_WRAPPER = """
import errno, os, runpy, sys
real_write = os.write
count = [0]

def write(fd, data):
    # Writes to the .partial log fail with ENOSPC after {n} records, half of the record first.
    try:
        target = os.readlink(f"/proc/self/fd/{{fd}}")
    except OSError:
        target = ""
    if target.endswith(".partial"):
        count[0] += 1
        if count[0] > {n}:
            real_write(fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(fd, data)

os.write = write
sys.argv = [{script!r}] + {args!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_resume_recomputes_exactly_what_changed(tiny_models, tmp_path):
    """Issues #12 and #19: a job stopped by a full disk, SIGTERM and SIGINT keeps every finished
    result and says how to resume; each re-run reuses exactly the results whose request, model and
    settings are unchanged (a changed prompt, a changed --max_tokens default, re-saved weights are
    recomputed, and it says so); corrupt and forged records of the .partial never reach the output."""
    import shutil
    import signal

    path, hf = tiny_models["llama3"]
    model = tmp_path / "model"
    shutil.copytree(path, model)   # its weights get touched below
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(30):
        r = {"id": f"q{i:02d}", "prompt_token_ids": rng.integers(0, 384, int(rng.integers(2, 30))).tolist()}
        if i % 2:
            r["max_tokens"] = int(rng.integers(5, 20))   # even lines take the --max_tokens default
        reqs.append(r)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    partial, lock = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.lock"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))

    def args(max_tokens):
        return [f"--model={model}", f"--input={inp}", f"--output={out}", *SLOW,
                f"--max_tokens={max_tokens}"]

    def keys_in_partial():
        return [json.loads(x)["k"] for x in partial.read_text().splitlines()[1:]]

    def stop_with(sig, n, max_tokens, unless=None):
        job = subprocess.Popen([sys.executable, SCRIPT, *args(max_tokens)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        _wait_for_records(job, partial, n, unless=unless)
        job.send_signal(sig)
        o, e = job.communicate(timeout=120)
        return job.returncode, o, e

    # 1. The disk fills after 6 results: exit 4, the 6 kept, a resume hint, no traceback.
    res = subprocess.run([sys.executable, "-c", _ENOSPC_WRAPPER.format(n=6, script=SCRIPT,
                                                                       args=args(20))],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 4, res.stderr[-3000:]
    assert "No space left on device" in res.stderr and "the 6 results written before it are kept" in res.stderr
    assert "run the same command again to compute the remaining 24" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists() and not lock.exists()
    assert len(keys_in_partial()) == 6

    # 2. The re-run reuses exactly those 6; SIGTERM stops it with every finished result kept.
    rc, o, e = stop_with(signal.SIGTERM, 10, 20)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in e
    assert "resuming from" in o and "6 of 30 results reused" in o and "recomputing" not in o
    saved = keys_in_partial()
    assert f"interrupted by SIGTERM: {len(saved)} of 30 results are saved in {partial}; run the " \
           "same command again to resume" in e
    assert len(saved) == len(set(saved)) >= 10 and not lock.exists()

    # 3. Line 2's prompt changes, the --max_tokens default changes (used by the even lines), and
    # the .partial gets a garbage line, a forged record and a record of the old format.
    reqs[1]["prompt_token_ids"] = [5, 6, 7, 8]
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    stale = [k for k in saved if k.startswith("2:") or int(k.split(":")[0]) % 2 == 1]
    plines = partial.read_text().splitlines()
    plines.insert(3, "garbage {{{")
    plines.append(json.dumps({"k": "4:q03", "h": {"r": "x", "m": "y", "e": "z"}, "sum": "0" * 32,
                              "rec": {"id": "q03", "text": "INJECTED", "token_ids": [1],
                                      "finish_reason": "stop", "error": None}}))
    plines.append('{"_key": "1:q00"}')
    partial.write_text("\n".join(plines) + "\n")
    rc, o, e = stop_with(signal.SIGINT, len(saved) - len(stale) + 3, 12, unless=b"garbage")
    assert rc == 128 + signal.SIGINT and "Traceback" not in e, e[-2000:]
    assert f"{len(saved) - len(stale)} of 30 results reused" in o
    assert f"recomputing {len(stale)} earlier results: {len(stale)} request changed" in o
    assert ("dropped 3 records of" in o and "1 checksum mismatch (edited or corrupt)" in o
            and "1 not a result record" in o and "1 unreadable line" in o)
    assert "interrupted by SIGINT" in e and "run the same command again to resume" in e
    saved = keys_in_partial()
    assert len(saved) == len(set(saved))

    # 4. The weights are re-saved (a new mtime): every saved result is recomputed; then it ends.
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[0]
    st = os.stat(model / shard)
    os.utime(model / shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = subprocess.run([sys.executable, SCRIPT, *args(12)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "0 of 30 results reused" in res.stdout
    assert f"recomputing {len(saved)} earlier results: {len(saved)} model changed" in res.stdout
    assert "wrote 30 results to" in res.stdout and "(30 ok, 0 errors; 30 computed now, 0 from" in res.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [r["id"] for r in reqs]   # each id once, in order
    for r, q in zip(recs, reqs):
        assert r["token_ids"] == greedy(hf, q["prompt_token_ids"], q.get("max_tokens", 12)), r["id"]
    assert "INJECTED" not in out.read_text()
    assert not partial.exists() and not lock.exists()


def test_job_refuses_to_start_before_loading_the_model(tiny_models, tmp_path):
    """Issues #12 and #19: bad paths, a locked output, another job's .partial, nothing to run, a
    non-UTF-8 file and an unsupported model are each one clear line (exit 2 or 3) before any
    compile; --help lists the engine flags; no TPU probe noise."""
    from jaxserve.io import OutputLock

    path, _ = tiny_models["llama3"]
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt_token_ids": [1, 2]}\n')

    def run(*extra, model=path, out=tmp_path / "o.jsonl", input=inp):
        res = subprocess.run([sys.executable, SCRIPT, f"--model={model}", f"--input={input}",
                              f"--output={out}", *SMALL, *extra], capture_output=True, text=True,
                             timeout=300)
        assert "programs compiled" not in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert "Unable to initialize backend 'tpu'" not in res.stderr
        return res.returncode, res.stderr.strip().splitlines()[-1]

    (tmp_path / "adir").mkdir()
    assert run(out=tmp_path / "adir") == (2, f"error: --output={tmp_path / 'adir'} is a directory; "
                                             f"name a file in it, e.g. --output={tmp_path / 'adir' / 'results.jsonl'}")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    unwritable = ro if not os.access(ro, os.W_OK) else "/sys/kernel"   # root writes in any other
    rc, msg = run(out=os.path.join(unwritable, "o.jsonl"))
    assert rc == 2 and f"cannot write in the output folder {unwritable}" in msg, msg
    rc, msg = run(out=inp)
    assert rc == 2 and "is the input file" in msg
    assert inp.read_text() == '{"id": 1, "prompt_token_ids": [1, 2]}\n'
    (tmp_path / "afile").write_text("")
    assert run(out=tmp_path / "afile" / "o.jsonl")[1].startswith(
        f"error: cannot create the output folder {tmp_path / 'afile'}")

    held = OutputLock(str(tmp_path / "o.jsonl"))
    held.acquire(str(inp))
    rc, msg = run()
    held.release()
    assert rc == 2 and f"{tmp_path / 'o.jsonl.lock'}: another job is writing this output (pid {os.getpid()}" in msg

    other = ResultsLog(str(tmp_path / "o.jsonl"), {"input": "/x/other.jsonl", "model": "/x/m"})
    other.start({})
    other.append("1:1", Hashes("r", "m", "e"), {"id": 1})
    other.close()
    rc, msg = run()
    assert rc == 2 and "holds results of another job (input /x/other.jsonl" in msg and "--overwrite" in msg
    (tmp_path / "o.jsonl.partial").unlink()

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert run(input=empty) == (3, f"error: nothing to run: {empty} has no requests (it is empty)")
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text('{"id": 1}\n[1]\n{"id": 3, "prompt_token_ids": [1], "top_k": 10000000000}\n')
    assert run(input=allbad) == (3, f"error: nothing to run: all 3 lines of {allbad} are invalid")
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes('{"id": 1, "prompt_token_ids": [1, 2]}\n'.encode("utf-16"))
    rc, msg = run(input=utf16)
    assert rc == 2 and "UTF-16 (little-endian)" in msg and "must be UTF-8" in msg
    assert run(input=tmp_path / "nope.jsonl") == (2, f"error: input file not found: {tmp_path / 'nope.jsonl'}")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    rc, msg = run(model=gpt2)
    assert rc == 2 and msg == (f"error: cannot load the model: {gpt2 / 'config.json'}: architecture "
                               "'GPT2LMHeadModel' is not supported (supported: LlamaForCausalLM, "
                               "MistralForCausalLM, Qwen2ForCausalLM)")
    res = subprocess.run([sys.executable, SCRIPT, f"--model={gpt2}", f"--input={inp}",
                          f"--output={tmp_path / 'o.jsonl'}", "--verbose"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" in res.stderr   # --verbose shows it
    rc, msg = run(model=tmp_path / "no-such-model")
    assert rc == 2 and msg == f"error: {tmp_path / 'no-such-model'}: file or directory not found"
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.partial").exists()

    helptext = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                              timeout=300).stdout
    for flag in ("--max_num_batched_tokens", "--attention_impl", "--page_size", "--dtype",
                 "--[no]overwrite", "--max_line_bytes"):
        assert flag in helptext, flag
