"""Turn a source of HF-named tensors into the model's parameter tree, one parameter at a time.

Every loader (safetensors, GGUF) only has to answer `get(hf_name) -> np.ndarray` in HF names and
orientation; this module checks shapes, converts orientation and fusion, stacks layers, casts to the
requested dtype and places each parameter on the device as soon as it is built, so host memory
holds at most one stacked parameter at a time.

Under tensor parallelism (a `mesh`) each parameter goes straight from the host onto its shards:
every device receives only its slice (in multi-process runs, every process only its devices'
slices), so no device ever holds a whole sharded tensor, and the fused QKV / gate-up columns are
laid out per shard first (`ModelSpec.tp_column_order`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models import get_model_spec
from jaxserve.runner import mesh as mesh_mod


class WeightError(ValueError):
    """A weight file that cannot be used; the message names the file and the tensor."""


def abstract_model(cfg: ModelConfig, dtype):
    """The model's structure with no arrays allocated."""
    spec = get_model_spec(cfg)
    return nnx.eval_shape(lambda: spec.model_cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def build_model(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype,
                where: Callable[[str], str] = lambda name: "?",
                device: Optional[jax.Device] = None, mesh: Optional[jax.sharding.Mesh] = None):
    """Assemble an NNX model from HF-named tensors.

    `get(name)` returns the tensor (any float dtype) or raises KeyError; `where(name)` names the file
    that holds it, for error messages. `mesh`: shard the parameters over it (tensor parallelism).
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

    tp = mesh_mod.mesh_size(mesh)
    mesh_mod.check_tensor_parallel(cfg, tp)
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))

    def put(pname: str, value: np.ndarray) -> jax.Array:
        if mesh is None:
            return jax.device_put(value, device) if device is not None else jax.device_put(value)
        sharding = jax.sharding.NamedSharding(mesh, mesh_mod.param_spec(cfg, pname, value.ndim, tp))
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    for path, var in flat.items():
        if path[0] == "layers":
            pname = path[1]
            names = spec.layer_map[pname]
            # Fused columns in per-shard order, one layer at a time (no second stacked copy).
            order = spec.tp_column_order(cfg, pname, tp) if spec.tp_column_order else None
            stacked = np.empty(var.value.shape, dtype=np_dtype)
            for i in range(cfg.num_layers):
                parts = [fetch(n.format(i=i)).astype(np.float32, copy=False) for n in names]
                layer = spec.to_param(pname, parts)
                stacked[i] = (layer if order is None else layer[..., order]).astype(np_dtype)
            value = stacked
        else:
            pname = path[0]
            value = spec.to_param(pname, [fetch(spec.top_map[pname]).astype(np.float32, copy=False)])
            value = value.astype(np_dtype)
        if tuple(value.shape) != tuple(var.value.shape):
            raise WeightError(f"parameter {'/'.join(map(str, path))}: built shape {value.shape}, "
                              f"model expects {var.value.shape}")
        var.value = put(pname, value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def dummy_model(cfg: ModelConfig, dtype, seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None):
    """Random weights of the right shape and dtype, created directly on the device (no host copy),
    or on their shards over `mesh` (each device generates only its slice).

    Scaled so activations stay O(1) through depth, as trained weights do: that keeps benchmark
    numerics (and any data-dependent kernel behaviour) realistic. (The fused columns are random
    either way, so they are not reordered per shard: the same seed gives a differently wired
    model under each tensor-parallel size.)
    """
    spec = get_model_spec(cfg)
    mesh_mod.check_tensor_parallel(cfg, mesh_mod.mesh_size(mesh))

    def init(key):
        model = spec.model_cls(cfg, dtype=dtype, rngs=nnx.Rngs(key))
        return nnx.split(model)[1]

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    shard = {} if mesh is None else dict(out_shardings=mesh_mod.param_shardings(abstract, cfg, mesh))
    state = jax.jit(init, **shard)(jax.random.key(seed))
    return nnx.merge(graphdef, state)


def place_model(model, device: jax.Device):
    """`model` with every array on `device`: the same model where it is there already, else a
    copy made device to device (data-parallel replicas load the weights once)."""
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    if all(getattr(x, "devices", lambda: set())() == {device} for x in leaves):
        return model
    return nnx.merge(graphdef, jax.device_put(state, device))


def place_model_on_mesh(model, cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """`model` with every parameter on its tensor-parallel shards over `mesh` (a data-parallel
    replica's). Loaded over all replicas at once (`mesh_mod.replica_mesh`), each replica's model
    is made of the shards its devices already hold, with no copy; loaded over another mesh of the
    same size, each parameter is copied there (every device of `mesh` receives only its slice).
    A model loaded for another size is refused: its fused columns are in that size's order."""
    graphdef, state = nnx.split(model)
    tp, have = mesh_mod.mesh_size(mesh), mesh_mod.loaded_size(state)
    if have != tp:
        raise ConfigError(f"engine: a replica of tensor_parallel_size={tp} needs the model loaded "
                          f"over a mesh of {tp} devices (runner.mesh.replica_mesh or make_mesh); "
                          f"this one was loaded for {have} (fused columns are laid out per shard)")
    shardings = mesh_mod.param_shardings(state, cfg, mesh)
    return nnx.merge(graphdef, jax.tree.map(mesh_mod.on_sharding, state, shardings))
