"""The engine's view of a tokenizer: ids in, text out, chat prompts, stop tokens; from a HF model
directory or from a GGUF file's tokenizer metadata (`gguf_tokenizer`)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

from jaxserve.text.errors import TokenizerError

# Tokens that close a chat turn in common templates; the model emits them instead of the file's EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


class Tokenizer:
    """The engine's view of a tokenizer: ids in, text out, chat prompts, stop tokens."""

    def __init__(self, hf_tokenizer, extra_eos_ids: Iterable[int] = (), source: str = ""):
        self.hf = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer
        self.source = source
        eos = set(int(i) for i in extra_eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        template = hf_tokenizer.chat_template or ""
        if isinstance(template, dict):  # several named templates
            template = "".join(template.values())
        for t in _END_OF_TURN:
            tid = self.backend.token_to_id(t)
            if tid is not None and t in template:
                eos.add(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer":
        from transformers import AutoTokenizer

        if not any(os.path.exists(os.path.join(model_dir, f))
                   for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise TokenizerError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        try:
            hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise TokenizerError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
        if not hf.is_fast:
            raise TokenizerError(f"{model_dir}: only fast (tokenizer.json) tokenizers are supported")
        extra = []
        # generation_config.json often lists more stop ids than the tokenizer (e.g. Llama 3's <|eot_id|>).
        for fname in ("generation_config.json", "config.json"):
            p = os.path.join(model_dir, fname)
            if os.path.exists(p):
                with open(p) as f:
                    e = json.load(f).get("eos_token_id")
                extra += e if isinstance(e, list) else ([e] if e is not None else [])
        return cls(hf, extra, source=model_dir)

    @classmethod
    def from_gguf_metadata(cls, md: dict, source: str = "<gguf>") -> "Tokenizer":
        """From a GGUF file's `tokenizer.*` metadata (the weights loader reads it)."""
        from jaxserve.text.gguf_tokenizer import build_gguf_tokenizer

        extra = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if md.get(k) is not None]
        return cls(build_gguf_tokenizer(md, source), extra, source=source)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> Optional[int]:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> Optional[str]:
        return self.hf.chat_template

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encodes in parallel in the Rust backend."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        if not self.hf.chat_template:
            raise TokenizerError(f"{self.source}: the tokenizer has no chat template")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                 **kwargs) -> list[int]:
        """Token ids of a chat prompt. Like transformers, no BOS is added on top of the rendered text:
        a template that wants BOS writes it itself."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
