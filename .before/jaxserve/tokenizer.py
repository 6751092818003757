"""Tokenizers: a HF fast tokenizer from a model directory or rebuilt from a GGUF file's metadata,
with chat templates, batched encoding and streaming (incremental) detokenisation.

A GGUF carries no tokenizer.json, only llama.cpp's description of one (vocabulary, merges, token
types, special ids, the name of its pre-tokenizer). We rebuild the `tokenizers.Tokenizer` from that
description ourselves, following llama.cpp's own rules (the ones the file was written for), and
check the result against transformers' independent GGUF conversion in the tests.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

from jaxserve.config import ConfigError


class TokenizerError(ConfigError):
    """A tokenizer we cannot build; the message names the file and the field."""


# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (split digits one by one first, main regex, ignore_merges). llama.cpp matches a whole
# pre-token against the vocabulary before merging for the llama3 family (`ignore_merges`).
_BPE_PRE = {
    "default": (False, _GPT2_SPLIT, False),
    "gpt-2": (False, _GPT2_SPLIT, False),
    "gpt2": (False, _GPT2_SPLIT, False),
    "smollm": (True, _GPT2_SPLIT, False),
    "starcoder": (True, _GPT2_SPLIT, False),
    "refact": (True, _GPT2_SPLIT, False),
    "codeshell": (True, _GPT2_SPLIT, False),
    "llama-bpe": (False, _LLAMA3_SPLIT, True),
    "llama3": (False, _LLAMA3_SPLIT, True),
    "llama-v3": (False, _LLAMA3_SPLIT, True),
    "smaug-bpe": (False, _LLAMA3_SPLIT, True),
    "falcon3": (False, _LLAMA3_SPLIT, True),
    "qwen2": (False, _QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (False, _QWEN2_SPLIT, False),
}

# Tokens that close a chat turn in common templates; the model emits them instead of the file's EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def _byte_level_bpe(md: dict, source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        raise TokenizerError(f"{source}: field 'tokenizer.ggml.pre'={pre!r} is not supported "
                             f"(supported: {', '.join(sorted(_BPE_PRE))})")
    digits, split, ignore_merges = _BPE_PRE[pre]
    tokens, types = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.token_type")
    alphabet = set(bytes_to_unicode().values())
    byte_map = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        kind = types[i] if types else _NORMAL
        # Ordinary tokens are spelled in the byte-level alphabet; a few converters store them as raw
        # text, which we respell. Added/control tokens stay raw: they are matched in raw text.
        if kind == _NORMAL and not set(tok) <= alphabet:
            tok = "".join(byte_map[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = md.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(f"{source}: required metadata key 'tokenizer.ggml.merges' is missing")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == _GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(md: dict, source: str):
    """llama.cpp's "llama" vocabulary: SentencePiece BPE with byte fallback; merges (rarely stored)
    are rebuilt from the piece scores, best first, as SentencePiece applies them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = md["tokenizer.ggml.tokens"]
    scores = md.get("tokenizer.ggml.scores")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if md.get("tokenizer.ggml.merges") is not None:
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    else:
        if scores is None:
            raise TokenizerError(f"{source}: a 'llama' tokenizer needs 'tokenizer.ggml.scores' or "
                                 "'tokenizer.ggml.merges'; neither is present")
        cands = []
        for piece, score in zip(tokens, scores):
            local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                     if piece[:k] in vocab and piece[k:] in vocab]
            cands.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
        cands.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
        merges = [(a, b) for a, b, _ in cands]
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                 prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def build_gguf_tokenizer(md: dict, source: str = "<gguf>"):
    """A `transformers.PreTrainedTokenizerFast` from a GGUF's `tokenizer.*` metadata."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    model = md.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in md:
        raise TokenizerError(f"{source}: no tokenizer in the file (metadata key "
                             f"'{'tokenizer.ggml.model' if model is None else 'tokenizer.ggml.tokens'}' is missing)")
    if model == "gpt2":
        tok = _byte_level_bpe(md, source)
        default_bos = False
    elif model == "llama":
        tok = _sentencepiece_bpe(md, source)
        default_bos = True  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
    else:
        raise TokenizerError(f"{source}: field 'tokenizer.ggml.model'={model!r} is not supported "
                             "(supported: gpt2, llama)")
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    # Control and user-defined tokens are matched whole before pre-tokenisation, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def name_of(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = name_of("bos_token_id"), name_of("eos_token_id")
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    specials = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=name_of("unknown_token_id"),
        pad_token=name_of("padding_token_id"), chat_template=md.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False)


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
    def from_gguf(cls, source) -> "Tokenizer":
        """From a GGUF path or an open `GGUFCheckpoint` (reading the file's metadata takes seconds)."""
        from jaxserve.weights.gguf_loader import GGUFCheckpoint

        ck = source if isinstance(source, GGUFCheckpoint) else GGUFCheckpoint(source)
        md = ck.tokenizer_metadata
        extra = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if md.get(k) is not None]
        return cls(build_gguf_tokenizer(md, ck.path), extra, source=ck.path)

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


class IncrementalDetokenizer:
    """Streaming text for a growing list of output ids (vLLM's prefix/read offsets).

    Each step decodes a short window `ids[prefix:]` and its old part `ids[prefix:read]`, and emits
    the difference. Text is held back while it ends in U+FFFD (a multi-byte character split across
    tokens) and `finish()` flushes the rest, so the concatenated stream equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids):
        return self.tok.backend.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: Iterable[int]) -> str:
        """Append ids; return the newly completed text (possibly empty)."""
        self.ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def finish(self) -> str:
        """Flush text held back at the end (e.g. an incomplete character the output ended on)."""
        full = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        # Windows decode the same bytes as the full decode (checked in the tests), so `full` extends
        # what was streamed; only the held-back tail is new.
        delta = full[len(self.text):]
        self.text += delta
        return delta
