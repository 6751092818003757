"""Model registry: HF `architectures` name -> model class and its weight-name map."""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models import llama


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model_cls: type
    layer_map: dict                 # param name -> HF per-layer tensor names ("{i}" = layer)
    top_map: dict                   # param name -> HF top-level tensor name
    expected_shapes: Callable       # ModelConfig -> {HF name: shape}
    to_param: Callable              # (param name, [np arrays]) -> our array


_LLAMA = ModelSpec(llama.LlamaForCausalLM, llama.HF_LAYER_MAP, llama.HF_TOP_MAP,
                   llama.hf_expected_shapes, llama.hf_to_param)

REGISTRY: dict[str, ModelSpec] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
}


def get_model_spec(cfg: ModelConfig) -> ModelSpec:
    try:
        return REGISTRY[cfg.architecture]
    except KeyError:
        raise ConfigError(f"architecture {cfg.architecture!r} is not supported "
                          f"(supported: {', '.join(sorted(REGISTRY))})") from None
