"""A HF fast tokenizer rebuilt from a GGUF file's metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one (vocabulary, merges, token
types, special ids, the name of its pre-tokenizer). We rebuild the `tokenizers.Tokenizer` from that
description ourselves, following llama.cpp's own rules (the ones the file was written for), and
check the result against transformers' independent GGUF conversion in the tests.
"""
from __future__ import annotations

from jaxserve.text.errors import TokenizerError


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
