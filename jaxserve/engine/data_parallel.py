"""Data parallelism: M engine replicas, one per device group, driven from one process; each
replica on one device or, under tensor parallelism, split over its group's own mesh.

`DataParallelEngine.run` splits the batch by prefix subtree (`scheduler.partition`: balanced by
planned cost, each shared-prefix group on one replica unless balance needs it split), compiles
every replica's programs (replica 0 first: on GPU the others then load them from JAX's persistent
compilation cache, whose key leaves the device out there), runs the replicas' `Engine.run`
concurrently in threads (dispatch and device work release the GIL) and merges the outputs in
input order. `on_output` and `progress` are called under one lock, so a results log written from
them sees one writer. Stats are the replicas' sums plus the plan and each replica's cost and time.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import jax

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.engine.engine import Engine
from jaxserve.engine.outputs import RequestOutput
from jaxserve.engine.requests import Request
from jaxserve.engine.stats import RunStats
from jaxserve.scheduler.partition import CostModel, Partition, WorkItem, partition


def device_groups(devices: Sequence, tensor_parallel_size: int,
                  data_parallel_size: int) -> list[list]:
    """`data_parallel_size` groups of `tensor_parallel_size` consecutive devices (neighbours on
    one host share the fastest links, which tensor parallelism needs and data parallelism does
    not)."""
    need = tensor_parallel_size * data_parallel_size
    if need > len(devices):
        raise ConfigError(f"engine: tensor_parallel_size={tensor_parallel_size} x "
                          f"data_parallel_size={data_parallel_size} needs {need} devices; "
                          f"{len(devices)} are visible")
    tp = tensor_parallel_size
    return [list(devices[r * tp:(r + 1) * tp]) for r in range(data_parallel_size)]


def replica_groups(ecfg: EngineConfig, devices: Optional[Sequence] = None) -> list[list]:
    """The replicas' device groups for `ecfg` over `devices` (default: all visible)."""
    if jax.process_count() > 1:
        # One process drives every replica, so it must reach every replica's devices.
        raise ConfigError("engine: data_parallel_size > 1 runs in one process; across hosts use "
                          "tensor_parallel_size alone, or scripts/run_batch_ray.py")
    return device_groups(jax.devices() if devices is None else devices,
                         ecfg.tensor_parallel_size, ecfg.data_parallel_size)


@dataclasses.dataclass
class DataParallelStats(RunStats):
    """The replicas' counters summed (wall and compile time: of the whole run), and the plan."""

    data_parallel_size: int = 1
    dp_split_groups: int = 0                # shared-prefix groups spread over 2+ replicas
    dp_duplicated_prefix_tokens: int = 0    # prefix tokens computed on more than one replica
    dp_planned_imbalance: float = 0.0       # slowest replica's planned cost / mean - 1
    dp_replica_requests: list = dataclasses.field(default_factory=list)
    dp_replica_planned_seconds: list = dataclasses.field(default_factory=list)
    dp_replica_wall_seconds: list = dataclasses.field(default_factory=list)
    dp_replica_compile_seconds: list = dataclasses.field(default_factory=list)
    dp_replica_compiled_programs: list = dataclasses.field(default_factory=list)
    dp_replica_compile_cache_hits: list = dataclasses.field(default_factory=list)


_SUMMED = ("prompt_tokens", "computed_prefill_tokens", "optimal_prefill_tokens",
           "reused_prompt_tokens", "num_groups", "num_shared_prefixes", "generated_tokens",
           "decode_tokens", "preemptions", "num_steps", "fused_blocks", "padded_tokens",
           "num_requests", "num_errors", "peak_kv_pages", "kv_pages_total", "mid_run_compiles")


class _LiveTotals:
    """The replicas' running counters summed, for progress callbacks."""

    def __init__(self, n: int):
        self.parts: list = [None] * n

    def __getattr__(self, name):
        return sum(getattr(s, name) for s in self.parts if s is not None)


class DataParallelEngine:
    def __init__(self, replicas: list[Engine], devices: list[list], cost: Optional[CostModel] = None):
        if not replicas:
            raise ValueError("DataParallelEngine needs at least one replica")
        self.replicas = replicas
        self.devices = devices
        first = replicas[0]
        self.cfg, self.ecfg, self.tokenizer = first.cfg, first.ecfg, first.tokenizer
        self.cost = cost or CostModel.for_model(first.cfg,
                                                first.runner.k_cache.dtype.itemsize)
        self.last_stats: RunStats = DataParallelStats(data_parallel_size=len(replicas))
        self.last_partition: Optional[Partition] = None
        self.last_compile: dict = {}

    @classmethod
    def build(cls, model_cfg: ModelConfig, model, ecfg: EngineConfig, *, devices=None,
              **engine_kwargs) -> "DataParallelEngine":
        """Replicas of `model`, one per device group, each with its own copy of the parameters
        and its own KV cache on its devices; under tensor parallelism each replica is split over
        its group's own mesh. `model` may be loaded anywhere (split over a mesh of
        `tensor_parallel_size` devices when that is > 1); loaded over
        `runner.mesh.replica_mesh(replica_groups(ecfg))` the replicas take their shards of it
        without a copy (what `LLM` does)."""
        from jaxserve.runner.mesh import make_mesh
        from jaxserve.weights.assemble import place_model, place_model_on_mesh

        tp = ecfg.tensor_parallel_size
        groups = replica_groups(ecfg, devices)
        # Every copy is placed before any engine exists: an engine sizes its KV cache from the
        # memory its devices have left, and may re-lay its weights (unrolled layer loop).
        if tp == 1:
            models = [place_model(model, g[0]) for g in groups]
            places = [dict(device=g[0]) for g in groups]
        else:
            meshes = [make_mesh(tp, g) for g in groups]
            models = [place_model_on_mesh(model, model_cfg, m) for m in meshes]
            places = [dict(mesh=m) for m in meshes]
        replicas = [Engine(model_cfg, m, ecfg, **where, **engine_kwargs)
                    for m, where in zip(models, places)]
        return cls(replicas, groups)

    # -- what callers of a single Engine read ---------------------------------------------------
    @property
    def runner(self):
        """Replica 0's runner (every replica compiles the same programs for its own devices)."""
        return self.replicas[0].runner

    def __getattr__(self, name):
        if name in ("attention_impl", "num_pages", "max_model_len", "compilation_cache_dir",
                    "sizes", "buckets", "layer_loop", "limits", "eos_token_ids"):
            return getattr(self.replicas[0], name)
        raise AttributeError(name)

    # -- the plan --------------------------------------------------------------------------------
    def partition(self, requests: list[Request]) -> Partition:
        share = self.ecfg.global_prefix_sharing
        items = [WorkItem([] if r.error else r.prompt_ids, r.params.max_tokens, r.params.n,
                          shareable=share and r.params.prompt_logprobs is None)
                 for r in requests]
        return partition(items, len(self.replicas), cost=self.cost)

    def _compile(self, parts: list[list[Request]]) -> list[dict]:
        """Replica by replica, replica 0 first: on GPU the rest are persistent-cache hits."""
        out = []
        for k, (eng, reqs) in enumerate(zip(self.replicas, parts)):
            if reqs:
                if len(self.replicas) > 1:
                    on = ", ".join(str(d) for d in self.devices[k])
                    print(f"replica {k}/{len(self.replicas)} on {on}:",
                          file=sys.stderr, flush=True)
                eng.compile_for(reqs)
                out.append(dict(eng.last_compile))
            else:
                out.append(dict(programs=0, seconds=0.0, cache_hits=0))
        return out

    def compile_for(self, requests: list[Request]) -> int:
        part = self.partition(requests)
        info = self._compile([[requests[i] for i in p] for p in part.parts])
        return sum(c["programs"] for c in info)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, requests: list[Request], progress: Optional[Callable] = None,
            on_output: Optional[Callable[[int, RequestOutput], None]] = None,
            positions: Optional[list[int]] = None) -> list[RequestOutput]:
        t_start = time.perf_counter()
        part = self.partition(requests)
        self.last_partition = part
        parts = [[requests[i] for i in p] for p in part.parts]
        t0 = time.perf_counter()
        compiled = self._compile(parts)
        compile_seconds = time.perf_counter() - t0
        self.last_compile = dict(programs=sum(c["programs"] for c in compiled),
                                 seconds=compile_seconds,
                                 cache_hits=sum(c["cache_hits"] for c in compiled),
                                 replicas=compiled)
        lock = threading.Lock()
        live = _LiveTotals(len(self.replicas))
        results: list[Optional[RequestOutput]] = [None] * len(requests)
        walls = [0.0] * len(self.replicas)
        errors: list = []

        def work(k: int) -> None:
            idx = part.parts[k]

            def emit(j, out):
                with lock:
                    results[idx[j]] = out
                    if on_output is not None:
                        on_output(idx[j], out)

            def report(n_done, n_tok, stats):
                with lock:
                    live.parts[k] = stats
                    if progress is not None:
                        progress(n_done, n_tok, live)

            t = time.perf_counter()
            try:
                with jax.default_device(self.devices[k][0]):
                    self.replicas[k].run(parts[k], progress=report, on_output=emit,
                                         positions=idx if positions is None
                                         else [positions[i] for i in idx])
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
                errors.append(e)
            walls[k] = time.perf_counter() - t

        threads = [threading.Thread(target=work, args=(k,), name=f"jaxserve-replica-{k}",
                                    daemon=True)
                   for k in range(len(self.replicas)) if parts[k]]
        t_threads = time.perf_counter() - t_start
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        self.last_stats = self._merge(part, parts, compiled, walls, compile_seconds,
                                      time.perf_counter() - t_start, t_threads)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _merge(self, part: Partition, parts, compiled, walls, compile_seconds, wall,
               offset) -> DataParallelStats:
        st = DataParallelStats(data_parallel_size=len(self.replicas))
        ran = [eng.last_stats if reqs else RunStats() for eng, reqs in zip(self.replicas, parts)]
        for name in _SUMMED:
            setattr(st, name, sum(getattr(s, name) for s in ran))
        st.compiled_programs = sum(c["programs"] for c in compiled)
        st.compile_cache_hits = sum(c["cache_hits"] for c in compiled)
        st.compile_seconds = compile_seconds
        st.wall_seconds = wall
        st.trace = sorted((t + offset, *rest) for s in ran for (t, *rest) in s.trace)
        st.dp_split_groups = part.split_groups
        st.dp_duplicated_prefix_tokens = part.duplicated_prefix_tokens
        st.dp_planned_imbalance = part.imbalance
        st.dp_replica_requests = [len(p) for p in part.parts]
        st.dp_replica_planned_seconds = list(part.costs)
        st.dp_replica_wall_seconds = list(walls)
        st.dp_replica_compile_seconds = [c["seconds"] for c in compiled]
        st.dp_replica_compiled_programs = [c["programs"] for c in compiled]
        st.dp_replica_compile_cache_hits = [c["cache_hits"] for c in compiled]
        return st
