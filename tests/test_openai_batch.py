"""Issue #7: an OpenAI Batch API file round-trips through run_batch.py."""
from __future__ import annotations

import json
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
    ]
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = run(vocab_model_dir, inp, tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in recs] == [x["custom_id"] for x in lines]
    ok = {r["custom_id"]: r for r in recs if r["error"] is None}
    assert set(ok) == {"c1", "t1", "c2"}
    for cid, obj in (("c1", "chat.completion"), ("t1", "text_completion"), ("c2", "chat.completion")):
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
    # The same requests in the plain format give the same completions.
    plain = [{"id": "c1", "messages": lines[0]["body"]["messages"], "max_tokens": 12, "temperature": 0},
             {"id": "t1", "prompt": "Once upon a time", "max_tokens": 9, "temperature": 0}]
    inp2 = tmp_path / "plain.jsonl"
    inp2.write_text("".join(json.dumps(x) + "\n" for x in plain))
    recs2 = run(vocab_model_dir, inp2, tmp_path / "out2.jsonl")
    assert recs2[0]["text"] == ok["c1"]["response"]["body"]["choices"][0]["message"]["content"]
    assert recs2[1]["text"] == ok["t1"]["response"]["body"]["choices"][0]["text"]
