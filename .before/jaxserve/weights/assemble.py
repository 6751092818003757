"""Turn a source of HF-named tensors into the model's parameter tree, one parameter at a time.

Every loader (safetensors, GGUF) only has to answer `get(hf_name) -> np.ndarray` in HF names and
orientation; this module checks shapes, converts orientation and fusion, stacks layers, casts to the
requested dtype and places each parameter on the device as soon as it is built, so host memory
holds at most one stacked parameter at a time.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models import get_model_spec


class WeightError(ValueError):
    """A weight file that cannot be used; the message names the file and the tensor."""


def abstract_model(cfg: ModelConfig, dtype):
    """The model's structure with no arrays allocated."""
    spec = get_model_spec(cfg)
    return nnx.eval_shape(lambda: spec.model_cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def build_model(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype,
                where: Callable[[str], str] = lambda name: "?",
                device: Optional[jax.Device] = None):
    """Assemble an NNX model from HF-named tensors.

    `get(name)` returns the tensor (any float dtype) or raises KeyError; `where(name)` names the file
    that holds it, for error messages.
    """
    spec = get_model_spec(cfg)
    expected = spec.expected_shapes(cfg)
    np_dtype = jnp.dtype(dtype)

    def fetch(name: str) -> np.ndarray:
        try:
            arr = get(name)
        except KeyError:
            raise WeightError(f"tensor '{name}' is missing from the checkpoint") from None
        want = expected.get(name)
        if want is not None and tuple(arr.shape) != tuple(want):
            raise WeightError(f"{where(name)}: tensor '{name}' has shape {tuple(arr.shape)}, "
                              f"expected {tuple(want)} from the config")
        return arr

    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    put = (lambda a: jax.device_put(a, device)) if device is not None else jax.device_put
    for path, var in flat.items():
        if path[0] == "layers":
            pname = path[1]
            names = spec.layer_map[pname]
            stacked = np.empty(var.value.shape, dtype=np_dtype)
            for i in range(cfg.num_layers):
                parts = [fetch(n.format(i=i)).astype(np.float32, copy=False) for n in names]
                stacked[i] = spec.to_param(pname, parts).astype(np_dtype)
            value = stacked
        else:
            pname = path[0]
            value = spec.to_param(pname, [fetch(spec.top_map[pname]).astype(np.float32, copy=False)])
            value = value.astype(np_dtype)
        if tuple(value.shape) != tuple(var.value.shape):
            raise WeightError(f"parameter {'/'.join(map(str, path))}: built shape {value.shape}, "
                              f"model expects {var.value.shape}")
        var.value = put(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def dummy_model(cfg: ModelConfig, dtype, seed: int = 0):
    """Random weights of the right shape and dtype, created directly on the device (no host copy).

    Scaled so activations stay O(1) through depth, as trained weights do: that keeps benchmark
    numerics (and any data-dependent kernel behaviour) realistic.
    """
    spec = get_model_spec(cfg)

    @jax.jit
    def init(key):
        model = spec.model_cls(cfg, dtype=dtype, rngs=nnx.Rngs(key))
        return nnx.split(model)[1]

    graphdef = nnx.split(abstract_model(cfg, dtype))[0]
    state = init(jax.random.key(seed))
    return nnx.merge(graphdef, state)
