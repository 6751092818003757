"""Model registry: HF `architectures` name -> model class and its weight-name map."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models import llama


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model_cls: type
    layer_map: dict                 # param name -> HF per-layer tensor names ("{i}" = layer)
    top_map: dict                   # param name -> HF top-level tensor name
    expected_shapes: Callable       # ModelConfig -> {HF name: shape}
    to_param: Callable              # (param name, [np arrays]) -> our array
    tp_split_axes: dict = dataclasses.field(default_factory=dict)   # param name -> axis TP splits
    tp_vocab_params: tuple = ()     # params split on the vocabulary (replicated if it won't divide)
    tp_column_order: Optional[Callable] = None   # (cfg, name, tp) -> fused column order | None


_LLAMA = ModelSpec(llama.LlamaForCausalLM, llama.HF_LAYER_MAP, llama.HF_TOP_MAP,
                   llama.hf_expected_shapes, llama.hf_to_param, llama.TP_SPLIT_AXES,
                   llama.TP_VOCAB_PARAMS, llama.tp_column_order)

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
