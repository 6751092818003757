"""Issue #7: an OpenAI Batch API file round-trips through run_batch.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

from tests.helpers_weights import smollm2_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vocab_model_dir(tmp_path_factory):
    """A tiny random model over SmolLM2's vocabulary, saved with SmolLM2's tokenizer and chat
    template, so chat and text prompts work end to end in seconds."""
    from jaxserve.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf())
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=True,
                                  bos_token_id=1, eos_token_id=2)
    path = str(tmp_path_factory.mktemp("vocab_model"))
    transformers.LlamaForCausalLM(hc).save_pretrained(path)
    tok.hf.save_pretrained(path)
    return path


def run(model, inp, out, *extra):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"),
                          f"--model={model}", f"--input={inp}", f"--output={out}", "--use_tqdm=false",
                          "--max_num_batched_tokens=64", "--max_num_seqs=8", "--max_model_len=256",
                          "--page_size=8", "--num_pages=200", "--attention_impl=reference", *extra],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(x) for x in open(out)]


def test_openai_batch_file_round_trips(vocab_model_dir, tmp_path):
    chat = lambda q: {"model": "m", "messages": [{"role": "system", "content": "Be brief."},  # noqa: E731
                                                  {"role": "user", "content": q}],
                      "max_tokens": 12, "temperature": 0}
    lines = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": chat("Hi there")},
        {"custom_id": "t1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "Once upon a time", "max_tokens": 9, "temperature": 0}},
        {"custom_id": "bad-n", "method": "POST", "url": "/v1/chat/completions", "body": {**chat("x"), "n": 0}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat("Name a colour"), "stop": ["\n"], "seed": 3, "temperature": 0.8}},
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "bad-field", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "a", "best_of": 2}},
        {"custom_id": "bad-max", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "a", "max_tokens": 0}},
        # Logprobs and penalties (OpenAI's fields; repetition_penalty as in vLLM).
        {"custom_id": "c-lp", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat("Count to five"), "logprobs": True, "top_logprobs": 3,
                  "presence_penalty": 0.5, "frequency_penalty": 0.8}},
        {"custom_id": "t-lp", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "The weather today", "max_tokens": 7, "temperature": 0,
                  "logprobs": 4, "repetition_penalty": 1.3, "frequency_penalty": 0.4}},
        {"custom_id": "bad-top", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat("x"), "logprobs": True, "top_logprobs": 21}},
        {"custom_id": "bad-top-nolp", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat("x"), "top_logprobs": 2}},
        {"custom_id": "bad-lp", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "a", "logprobs": 30}},
        {"custom_id": "bad-pen", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "a", "presence_penalty": 2.5}},
    ]
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = run(vocab_model_dir, inp, tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in recs] == [x["custom_id"] for x in lines]
    ok = {r["custom_id"]: r for r in recs if r["error"] is None}
    assert set(ok) == {"c1", "t1", "c2", "c-lp", "t-lp"}
    for cid, obj in (("c1", "chat.completion"), ("t1", "text_completion"), ("c2", "chat.completion"),
                     ("c-lp", "chat.completion"), ("t-lp", "text_completion")):
        r = ok[cid]
        assert r["id"].startswith("batch_req_") and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == obj and len(body["choices"]) == 1
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    assert ok["t1"]["response"]["body"]["usage"]["completion_tokens"] == 9
    assert "\n" not in ok["c2"]["response"]["body"]["choices"][0]["message"]["content"]
    errs = {r["custom_id"]: r["error"]["message"] for r in recs if r["error"] is not None}
    assert "'body.n'" in errs["bad-n"] and "line 3" in errs["bad-n"]
    assert "'url'" in errs["bad-url"]
    assert "'body.best_of'" in errs["bad-field"]
    assert "max_tokens" in errs["bad-max"]
    assert "'body.top_logprobs'" in errs["bad-top"] and "'body.top_logprobs'" in errs["bad-top-nolp"]
    assert "'body.logprobs'" in errs["bad-lp"] and "'body.presence_penalty'" in errs["bad-pen"]
    for cid in ("c1", "t1", "c2"):
        assert ok[cid]["response"]["body"]["choices"][0]["logprobs"] is None
    # Chat logprobs: one entry per completion token, top 3 sorted, the chosen token's among them
    # with the same value when it is there.
    body = ok["c-lp"]["response"]["body"]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 0
    for e in content:
        assert isinstance(e["token"], str) and e["bytes"] == list(e["token"].encode("utf-8"))
        assert math.isfinite(e["logprob"]) and e["logprob"] <= 0
        vals = [t["logprob"] for t in e["top_logprobs"]]
        assert len(vals) == 3 and vals == sorted(vals, reverse=True) and all(map(math.isfinite, vals))
        assert e["logprob"] <= vals[0] + 1e-6
        for t in e["top_logprobs"]:
            assert t["bytes"] == list(t["token"].encode("utf-8"))
            if t["token"] == e["token"]:
                assert abs(t["logprob"] - e["logprob"]) < 1e-6
    # Completions logprobs: tokens / token_logprobs / top_logprobs / text_offset.
    body = ok["t-lp"]["response"]["body"]
    ch = body["choices"][0]
    lp = ch["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n == 7
    assert lp["text_offset"][0] == 0 and all(
        b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))
    assert "".join(lp["tokens"]).startswith(ch["text"].strip()[:1])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        vals = list(top.values())
        assert math.isfinite(v) and len(top) <= 4 and vals == sorted(vals, reverse=True)
        assert v <= vals[0] + 1e-6
        if tok in top:
            assert abs(top[tok] - v) < 1e-6
    # The same requests in the plain format give the same completions.
    plain = [{"id": "c1", "messages": lines[0]["body"]["messages"], "max_tokens": 12, "temperature": 0},
             {"id": "t1", "prompt": "Once upon a time", "max_tokens": 9, "temperature": 0},
             {"id": "t-lp", "prompt": "The weather today", "max_tokens": 7, "temperature": 0,
              "logprobs": 4, "prompt_logprobs": 2, "repetition_penalty": 1.3,
              "frequency_penalty": 0.4}]
    inp2 = tmp_path / "plain.jsonl"
    inp2.write_text("".join(json.dumps(x) + "\n" for x in plain))
    recs2 = run(vocab_model_dir, inp2, tmp_path / "out2.jsonl")
    assert recs2[0]["text"] == ok["c1"]["response"]["body"]["choices"][0]["message"]["content"]
    assert recs2[1]["text"] == ok["t1"]["response"]["body"]["choices"][0]["text"]
    assert "logprobs" not in recs2[0] and "prompt_logprobs" not in recs2[1]
    # The plain record of the same completion: the same text and chosen-token logprobs, which are
    # transformers' log-softmax of the raw logits (before the penalties that chose the tokens).
    r = recs2[2]
    assert r["text"] == ch["text"] and len(r["logprobs"]) == len(r["token_ids"]) == 7
    chosen = [d[str(t)] for t, d in zip(r["token_ids"], r["logprobs"])]
    assert max(abs(a - b) for a, b in zip(chosen, lp["token_logprobs"])) < 1e-5
    from jaxserve.tokenizer import Tokenizer

    prompt_ids = Tokenizer.from_dir(vocab_model_dir).encode("The weather today")
    assert len(r["prompt_logprobs"]) == len(prompt_ids) and r["prompt_logprobs"][0] is None
    hf = transformers.LlamaForCausalLM.from_pretrained(vocab_model_dir).float().eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt_ids + r["token_ids"]])).logits[0], -1).numpy()
    n_p = len(prompt_ids)
    for i, (t, d) in enumerate(zip(r["token_ids"], r["logprobs"])):
        assert abs(d[str(t)] - ref[n_p - 1 + i, t]) < 1e-4
    for j in range(1, n_p):
        d = r["prompt_logprobs"][j]
        assert abs(d[str(prompt_ids[j])] - ref[j - 1, prompt_ids[j]]) < 1e-4
