"""Tensor parallelism's device side: the mesh (one model axis over N devices, in one process or
spanning several) and where each parameter, the KV cache and a step's inputs live on it.

Megatron-style, by parameter name (the model's `ModelSpec.tp_split_axes`): QKV and gate/up are
split by columns (heads), o_proj and down by rows, the vocabulary of the embedding and LM head
across devices (replicated when it does not divide), norms replicated; the KV cache is split on
its KV-head axis. The runner runs each program under `shard_map` over these specs, so every device
computes on its local heads only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models import get_model_spec

AXIS = "tp"
REPLICA_AXIS = "dp"


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise a ConfigError naming the field when the model cannot be split over `tp` devices."""
    if tp == 1:
        return
    for field, value in (("num_attention_heads", cfg.num_heads),
                         ("num_key_value_heads", cfg.num_kv_heads),
                         ("intermediate_size", cfg.intermediate_size)):
        if value % tp:
            raise ConfigError(f"{cfg.name or cfg.architecture}: tensor_parallel_size={tp} does "
                              f"not divide {field}={value} (each device holds {field} / "
                              f"tensor_parallel_size)")


def make_mesh(tp: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-axis mesh over `tp` devices: `devices`, else the first `tp` of `jax.devices()` (all
    processes' devices after `jax.distributed.initialize`)."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or len(devices) < tp:
        raise ConfigError(f"engine: tensor_parallel_size={tp} needs {tp} devices, "
                          f"{len(devices)} visible")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def replica_mesh(groups: Sequence[Sequence[jax.Device]]) -> Mesh:
    """A (replica, model) mesh over data-parallel replicas' device groups, for loading only: a
    parameter sharded over it (its spec names the model axis alone, so it is replicated across
    replicas) is read from the host once and lands as each replica's shards at the same time;
    `on_sharding` then hands every replica its own shards without a copy."""
    return Mesh(np.array([list(g) for g in groups]), (REPLICA_AXIS, AXIS))


def mesh_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.shape[AXIS]


def loaded_size(tree) -> int:
    """The tensor-parallel size arrays were loaded for: the model axis of the mesh they lie on
    (1 off any mesh). A loaded model's fused columns are ordered per shard for that size."""
    sizes = {dict(a.sharding.mesh.shape).get(AXIS, 1)
             if isinstance(a.sharding, NamedSharding) else 1 for a in jax.tree.leaves(tree)}
    return max(sizes, default=1)


def local_devices(mesh: Mesh) -> list[jax.Device]:
    """The mesh's devices this process drives."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def param_name(path) -> str:
    """The parameter name in a state path (the last dict key: 'qkv_proj', 'embed', ...)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(keys[-1])


def param_spec(cfg: ModelConfig, name: str, ndim: int, tp: int) -> P:
    """PartitionSpec of parameter `name` (stacked [L, ...] or one layer's [...], by `ndim`)."""
    spec = get_model_spec(cfg)
    axis = spec.tp_split_axes.get(name)
    if tp == 1 or axis is None or (name in spec.tp_vocab_params and cfg.vocab_size % tp):
        return P(*([None] * ndim))
    entries = [None] * ndim
    entries[axis] = AXIS
    return P(*entries)


def param_specs(state, cfg: ModelConfig, tp: int):
    """The state's tree (arrays or abstract arrays) with each leaf's PartitionSpec."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_spec(cfg, param_name(path), len(x.shape), tp), state)


def param_shardings(state, cfg: ModelConfig, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s),
                        param_specs(state, cfg, mesh_size(mesh)),
                        is_leaf=lambda x: isinstance(x, P))


def _same_slice(a, b, shape) -> bool:
    return all(x.indices(n) == y.indices(n) for x, y, n in zip(a, b, shape))


def on_sharding(a: jax.Array, sharding: NamedSharding) -> jax.Array:
    """`a` laid out as `sharding`. When every device of `sharding` already holds the slice it
    needs (a replica's devices of a parameter loaded over `replica_mesh`), the new array is made
    of those buffers: no copy, so a device never holds its weights twice. Otherwise a copy
    (`jax.device_put`, shard to shard)."""
    have = {s.device: s for s in a.addressable_shards}
    want = sharding.addressable_devices_indices_map(a.shape)
    if all(d in have and _same_slice(have[d].index, idx, a.shape) for d, idx in want.items()):
        return jax.make_array_from_single_device_arrays(a.shape, sharding,
                                                        [have[d].data for d in want])
    return jax.device_put(a, sharding)


def kv_spec() -> P:
    """KV cache [num_kv_heads, layers * pages, page_size, head_dim]: split on KV heads."""
    return P(AXIS, None, None, None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
    """Host arrays (the same on every process: the host schedule is deterministic) -> global
    arrays replicated over the mesh; each process transfers to its own devices only."""
    return jax.device_put(tree, replicated(mesh))


def to_host(a: jax.Array) -> np.ndarray:
    """A fully replicated result as numpy, from this process's first copy (a global array that
    spans other processes cannot be read whole)."""
    return np.asarray(a.addressable_data(0))


def per_device_bytes(a: jax.Array) -> int:
    """Bytes one device holds of `a` (its largest shard)."""
    return max(s.data.nbytes for s in a.addressable_shards)
