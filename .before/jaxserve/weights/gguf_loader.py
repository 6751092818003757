"""GGUF files of llama architecture (llama.cpp's format): config, tensors and tokenizer metadata.

GGUF stores llama.cpp names (`blk.3.attn_q.weight`) and ggml's dimension order; `gguf.GGUFReader`
already presents each tensor's rows as HF's `[out, in]`, so only names, dequantisation and one layout
change remain: llama.cpp's converter permutes the rows of Q and K so that its RoPE can rotate
adjacent pairs (x0, x1) where HF rotates halves (x_i, x_{i+d/2}). We undo that permutation, so the
tensors come out exactly as HF's `state_dict` and feed `assemble.build_model` like any other source.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

import numpy as np

from jaxserve.config import ConfigError, ModelConfig, RopeScaling, rope_inv_freq
from jaxserve.models import llama
from jaxserve.weights.assemble import WeightError

# HF name (per layer: "{i}") <- llama.cpp name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp adds that have no HF counterpart; `rope_freqs` is read into the config instead.
_NON_WEIGHTS = {"rope_freqs.weight"}

SUPPORTED_ARCHITECTURES = ("llama",)


def gguf_to_hf_name(name: str) -> Optional[str]:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> Optional[str]:
    for g, h in _TOP_NAMES.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py): per head, rows were reordered from
    [first half, second half] to interleaved pairs; put them back."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Truncated(Exception):
    pass


def _open_reader(path: str):
    """`gguf.GGUFReader`, but a file cut inside the tensor data names the first tensor it cuts
    (the plain reader fails on a numpy reshape with no name)."""
    import gguf

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            size = self.data.shape[0]
            for field in fields:
                _, name, _, dims, qtype, offset = field.parts
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(qtype[0]))]
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise _Truncated(f"tensor '{bytes(name).decode('utf-8', 'replace')}' needs bytes up to "
                                     f"{end}, file has {size}")
            super()._build_tensors(start_offs, fields)

    return Reader(path)


class GGUFCheckpoint:
    """A llama-architecture GGUF file as a source of HF-named float32 tensors and a ModelConfig."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise WeightError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        try:
            self.reader = _open_reader(self.path)
        except _Truncated as e:
            raise WeightError(f"{self.path}: truncated: {e}") from None
        except Exception as e:  # the reader raises ValueError/IndexError/... on a cut or garbled file
            raise WeightError(f"{self.path}: truncated or corrupt GGUF file ({size} bytes): "
                              f"{type(e).__name__}: {e}") from None
        self.arch = self._get_str("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{self.path}: field 'general.architecture'={self.arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self.tensors = {}
        for t in self.reader.tensors:
            # _open_reader already checked the ends; this guards a reader that maps lazily.
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise WeightError(f"{self.path}: truncated: tensor '{t.name}' needs bytes "
                                  f"[{t.data_offset}, {t.data_offset + t.n_bytes}), file has {size}")
            self.tensors[t.name] = t
        self.hf_to_gguf = {}
        for name in self.tensors:
            hf = gguf_to_hf_name(name)
            if hf is not None:
                self.hf_to_gguf[hf] = name
            elif name not in _NON_WEIGHTS:
                raise WeightError(f"{self.path}: tensor '{name}' has no counterpart in the llama model "
                                  "(unsupported GGUF variant)")
        self.config = self._build_config()
        self._expected = llama.hf_expected_shapes(self.config)

    # ---- metadata -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def meta(self, key: str, default: Any = ...) -> Any:
        """A metadata value (scalars as Python values, arrays as lists); a missing key raises
        ConfigError naming the file and key unless a default is given."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ConfigError(f"{self.path}: required metadata key '{key}' is missing")
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise ConfigError(f"{self.path}: metadata key '{key}' is unreadable ({e})") from None

    def _get_str(self, key: str) -> str:
        v = self.meta(key)
        if not isinstance(v, str):
            raise ConfigError(f"{self.path}: metadata key '{key}' should be a string, got {v!r}")
        return v

    def _get_int(self, key: str, default: Any = ...) -> Optional[int]:
        v = self.meta(key, default)
        if v is None:
            return None
        if isinstance(v, list):
            # Some converters write per-layer head counts; we only support uniform ones.
            if len(set(v)) != 1:
                raise ConfigError(f"{self.path}: metadata key '{key}' varies per layer ({v}); not supported")
            v = v[0]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ConfigError(f"{self.path}: metadata key '{key}' should be an integer, got {v!r}")
        return int(v)

    def _build_config(self) -> ModelConfig:
        a = self.arch
        hidden = self._get_int(f"{a}.embedding_length")
        heads = self._get_int(f"{a}.attention.head_count")
        kv_heads = self._get_int(f"{a}.attention.head_count_kv", heads)
        head_dim = self._get_int(f"{a}.attention.key_length", None) or (hidden // heads)
        rope_dim = self._get_int(f"{a}.rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise ConfigError(f"{self.path}: field '{a}.rope.dimension_count'={rope_dim} (partial rotary) "
                              f"is not supported; head dim is {head_dim}")
        vocab = self._vocab_size()
        tied = "output.weight" not in self.tensors
        eos = self._get_int("tokenizer.ggml.eos_token_id", None)
        theta = float(self.meta(f"{a}.rope.freq_base", 10000.0))
        ctx = self._get_int(f"{a}.context_length")
        try:
            cfg = ModelConfig(
                architecture="LlamaForCausalLM",
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=self._get_int(f"{a}.feed_forward_length"),
                num_layers=self._get_int(f"{a}.block_count"),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(self.meta(f"{a}.attention.layer_norm_rms_epsilon")),
                rope_theta=theta,
                rope_scaling=self._rope_scaling(theta, head_dim, ctx),
                max_position_embeddings=ctx,
                tie_word_embeddings=tied,
                attention_bias=False,
                sliding_window=None,
                bos_token_id=self._get_int("tokenizer.ggml.bos_token_id", None),
                eos_token_ids=(eos,) if eos is not None else (),
                name=self.path,
            )
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None
        return cfg

    def _vocab_size(self) -> int:
        if self.has("tokenizer.ggml.tokens"):
            return len(self.reader.fields["tokenizer.ggml.tokens"].data)
        v = self._get_int(f"{self.arch}.vocab_size", None)
        if v is None:
            emb = self.tensors.get("token_embd.weight")
            if emb is None:
                raise ConfigError(f"{self.path}: no 'tokenizer.ggml.tokens', '{self.arch}.vocab_size' or "
                                  "'token_embd.weight' to take the vocabulary size from")
            v = int(emb.shape[-1])  # ggml order: [hidden, vocab]
        return v

    def _rope_scaling(self, theta: float, head_dim: int, ctx: int) -> RopeScaling:
        a = self.arch
        rtype = self.meta(f"{a}.rope.scaling.type", "none")
        factor = float(self.meta(f"{a}.rope.scaling.factor", 1.0) or 1.0)
        if "rope_freqs.weight" in self.tensors:
            # Llama 3.1/3.2: llama.cpp stores llama3 scaling as per-frequency divisors, not parameters.
            return self._llama3_from_rope_freqs(theta, head_dim, ctx)
        if rtype in ("none", "") or factor == 1.0:
            return RopeScaling()
        if rtype == "linear":
            return RopeScaling(rope_type="linear", factor=factor)
        raise ConfigError(f"{self.path}: field '{a}.rope.scaling.type'={rtype!r} is not supported "
                          "(supported: none, linear, and llama3 via rope_freqs)")

    def _llama3_from_rope_freqs(self, theta: float, head_dim: int, ctx: int) -> RopeScaling:
        """Recover llama3 scaling parameters from llama.cpp's `rope_freqs` divisors.

        The llama3 rule depends only on `factor` and the two wavelength edges
        `orig/low_freq_factor`, `orig/high_freq_factor`: frequencies with wavelength above the low
        edge are divided by `factor`, below the high edge kept, and between them the divisor d has
        1/d = (1-s)/factor + s with s linear in 1/wavelength. So `orig` can be fixed (the file's
        original context length, else Llama 3.1's 8192) and the edges fitted. Few frequencies may
        lie between the edges (then any edges consistent with the table give the same model); the
        result is checked against the stored divisors, so a non-llama3 table cannot slip through.
        """
        import gguf

        t = self.tensors["rope_freqs.weight"]
        div = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
        if div.shape[0] != head_dim // 2:
            raise WeightError(f"{self.path}: tensor 'rope_freqs.weight' has {div.shape[0]} entries, "
                              f"expected {head_dim // 2}")
        base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        factor = float(div.max())
        orig = self._get_int(f"{self.arch}.rope.scaling.original_context_length", None) or 8192
        if factor <= 1.0 + 1e-6:
            return RopeScaling()
        inv_wl = base / (2 * math.pi)
        scaled = div >= factor * (1 - 1e-6)
        kept = div <= 1.0 + 1e-6
        medium = ~scaled & ~kept
        # x = 1/low edge wavelength (> every scaled frequency's), y = 1/high edge (< every kept one's).
        x_min = inv_wl[scaled].max()
        y_max = inv_wl[kept].min() if kept.any() else np.inf
        s = (1.0 / div[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
        if medium.sum() >= 2:
            slope, icpt = np.polyfit(inv_wl[medium], s, 1)          # s = slope * inv_wl + icpt
            x, y = -icpt / slope, (1.0 - icpt) / slope
        elif medium.sum() == 1:
            x = (x_min + inv_wl[medium][0]) / 2
            y = x + (inv_wl[medium][0] - x) / s[0]
        else:
            x = (x_min + y_max) / 2 if np.isfinite(y_max) else 2 * x_min
            y = (x + y_max) / 2 if np.isfinite(y_max) else 2 * x
        low, high = orig * x, orig * y
        rs = RopeScaling(rope_type="llama3", factor=factor, low_freq_factor=float(low),
                         high_freq_factor=float(high), original_max_position_embeddings=int(orig))
        probe = ModelConfig(head_dim=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta, rope_scaling=rs)
        if not np.allclose(rope_inv_freq(probe), base / div, rtol=1e-4):
            raise ConfigError(f"{self.path}: tensor 'rope_freqs.weight' does not follow llama3 rope "
                              "scaling; this kind of rope scaling is not supported")
        return rs

    @property
    def tokenizer_metadata(self) -> dict[str, Any]:
        """Every `tokenizer.*` key, with the `tokenizer.` prefix kept (llama.cpp's names)."""
        return {k: self.meta(k) for k in self.reader.fields if k.startswith("tokenizer.")}

    # ---- tensors ------------------------------------------------------------------------------
    def keys(self):
        return self.hf_to_gguf.keys()

    def where(self, name: str) -> str:
        g = self.hf_to_gguf.get(name)
        return f"{self.path} [{g}]" if g else self.path

    def get(self, name: str) -> np.ndarray:
        """Dequantised float32 tensor in HF name and orientation; KeyError for a name the model does
        not use, WeightError (naming the file) for one it needs that the file lacks."""
        import gguf

        gname = self.hf_to_gguf.get(name)
        if gname is None:
            if name in self._expected:
                raise WeightError(f"{self.path}: tensor '{hf_to_gguf_name(name)}' ({name}) is missing")
            raise KeyError(name)
        t = self.tensors[gname]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightError(f"{self.path}: tensor '{gname}' uses quantisation {t.tensor_type.name}, "
                              "which the gguf package cannot dequantise") from None
        w = np.asarray(w, dtype=np.float32)
        want = self._expected.get(name)
        if want is not None and tuple(w.shape) != tuple(want):
            raise WeightError(f"{self.path}: tensor '{gname}' ({name}) has shape {tuple(w.shape)}, "
                              f"expected {tuple(want)} from the file's metadata")
        if ".attn_q." in gname:
            w = unpermute_qk(w, self.config.num_heads)
        elif ".attn_k." in gname:
            w = unpermute_qk(w, self.config.num_kv_heads)
        return w
