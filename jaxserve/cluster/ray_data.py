"""A batch file on a Ray cluster: Ray Data's `map_batches` over an actor pool, one `LLM` per actor
(one GPU per actor, or one TPU host), rows split by prefix subtree before the actors.

    rows (JSONL / Parquet, run_batch's format) -> driver: keys (id + content hash), tokenize, split
    the rows not done yet into blocks by prefix subtree (`scheduler.partition`: balanced cost,
    shared-prefix groups whole) -> Ray Data: one dataset row per block, `map_batches(LLMPredictor,
    batch_size=1, concurrency=actors)`; each actor runs a block as one engine batch and writes its
    results to the block store -> driver: the output in input order from the store

The blocks are formed on the driver because only the token-level prefix tree knows which rows
share work; the dataset then needs no shuffle (a `groupby` shuffle also competes with the actors
for CPUs: on a 2-CPU cluster it never started). Fault tolerance is Ray's: actors restart
(`max_restarts=-1`) and a task lost with its actor is retried (`max_task_retries=-1`); a retried
block that was already written is skipped, one that was not is recomputed, and the keyed store
holds each result once. A re-run skips every row already in the store.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional

from jaxserve.cluster.block_store import BlockStore, block_name, row_key
from jaxserve.io.jsonl import parse_line, result_record, write_jsonl_atomic
from jaxserve.io.requests import engine_prompt, generate_args


@dataclasses.dataclass(frozen=True)
class Row:
    position: int       # among the input's rows (what run_batch's single engine run sees)
    line_no: int        # 1-based line in the input file (error messages name it)
    text: str           # the row as one JSON object
    key: str


def read_rows(path: str) -> list[Row]:
    """A JSONL file (blank lines skipped, as run_batch does) or a Parquet file (one row per
    record; null columns dropped) as keyed rows."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file not found: {path}")
    texts: list[tuple[int, str]] = []
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            texts.append((i, json.dumps({k: v for k, v in rec.items() if v is not None})))
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts = [(i, line.rstrip("\n")) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for pos, (line_no, text) in enumerate(texts):
        try:
            obj = json.loads(text)
            rid = obj.get("id", obj.get("custom_id")) if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            rid = None
        rows.append(Row(pos, line_no, text, row_key(rid if rid is not None else line_no, text)))
    return rows


def plan_blocks(rows: list[Row], defaults: dict, tokenizer, num_blocks: int, cost=None,
                max_model_len: Optional[int] = None) -> list[list[Row]]:
    """`rows` in at most `num_blocks` blocks balanced by planned cost, each shared-prefix group in
    one block unless balance needs it split (the prompts tokenized as the engine will)."""
    from jaxserve.engine.requests import to_request
    from jaxserve.scheduler.partition import WorkItem, partition

    items = []
    for r in rows:
        it = parse_line(r.line_no, r.text, defaults)
        req = to_request(r.position, engine_prompt(it), it.params or defaults, it.priority,
                         tokenizer)
        ok = req.error is None and (max_model_len is None or len(req.prompt_ids) < max_model_len)
        items.append(WorkItem(req.prompt_ids if ok else [], req.params.max_tokens, req.params.n,
                              shareable=req.params.prompt_logprobs is None))
    part = partition(items, max(1, min(num_blocks, len(rows))), cost=cost)
    return [[rows[i] for i in p] for p in part.parts if p]


def run_rows(llm, rows: list[Row], defaults: dict, model_name: str,
             use_tqdm: bool = False) -> dict[str, dict]:
    """One engine batch over `rows`: key -> output record, exactly as run_batch writes it."""
    items = [parse_line(r.line_no, r.text, defaults) for r in rows]
    tok = llm.tokenizer
    token_text = (lambda t: tok.decode([t], skip_special_tokens=False)) if tok is not None else str
    prompts, params, prios = generate_args(items, defaults, llm.engine_config.seed)
    outs = llm.generate(prompts, params, priority=prios, use_tqdm=use_tqdm,
                        positions=[r.position for r in rows])
    return {r.key: result_record(it, out, model_name, token_text)
            for r, it, out in zip(rows, items, outs)}


class LLMPredictor:
    """The callable class for `Dataset.map_batches`: one `LLM` per actor; each dataset row is a
    block (`block`: its store file name, `rows`: its rows as JSON), run as one engine batch and
    written to the block store before the task returns."""

    def __init__(self, model: Optional[str], engine_kwargs: dict, defaults: dict, store_dir: str,
                 model_name: str):
        from jaxserve import LLM

        self.llm = LLM(model, **engine_kwargs)
        self.defaults = defaults
        self.store = BlockStore(store_dir)
        self.model_name = model_name

    def run_block(self, name: str, rows: list[Row]) -> None:
        self.store.write(name, run_rows(self.llm, rows, self.defaults, self.model_name))

    def __call__(self, batch: dict) -> dict:
        names, counts = [], []
        for name, payload in zip(batch["block"], batch["rows"]):
            name = str(name)
            rows = [Row(**r) for r in json.loads(str(payload))]
            if not self.store.has(name):      # a retry of a block finished before a crash
                self.run_block(name, rows)
            names.append(name)
            counts.append(len(rows))
        return {"block": names, "num_rows": counts}


@dataclasses.dataclass
class RayJob:
    """A batch file through Ray Data; `run()` writes `output` (JSONL, input order)."""

    input: str
    output: str
    model: Optional[str] = None
    engine_kwargs: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    blocks_per_actor: int = 4             # more: finer retries and load balance; fewer: bigger batches
    max_rows_per_block: int = 4096
    resume: bool = True
    keep_store: bool = False
    predictor: Any = LLMPredictor         # the actor class (a subclass may add behaviour)
    ray_remote_args: dict = dataclasses.field(default_factory=dict)

    @property
    def store(self) -> BlockStore:
        return BlockStore(self.output + ".blocks")

    def model_name(self) -> str:
        return os.path.basename(self.model or "SmolLM2-135M-Instruct")

    def blocks(self, todo: list[Row]) -> list[list[Row]]:
        from jaxserve.scheduler.partition import CostModel
        from jaxserve.weights import load_config_and_tokenizer

        cfg, tok = load_config_and_tokenizer(self.model)
        n = max(self.num_actors * self.blocks_per_actor,
                math.ceil(len(todo) / self.max_rows_per_block))
        return plan_blocks(todo, self.defaults, tok, n, CostModel.for_model(cfg),
                           self.engine_kwargs.get("max_model_len"))

    def run(self) -> dict:
        t0 = time.perf_counter()
        rows = read_rows(self.input)
        store = self.store
        if not self.resume:
            store.remove()
        done = store.load()
        todo = [r for r in rows if r.key not in done]
        if done:
            print(f"resuming: {len(rows) - len(todo)} of {len(rows)} rows already done "
                  f"({store.root})", flush=True)
        n_blocks = 0
        if todo:
            blocks = self.blocks(todo)
            n_blocks = len(blocks)
            self._map(blocks)
            done = store.load()
        missing = [r for r in rows if r.key not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} rows have no result (first: line "
                               f"{missing[0].line_no}); run again to resume")
        write_jsonl_atomic(self.output, (done[r.key] for r in rows))
        if not self.keep_store:
            store.remove()
        return dict(rows=len(rows), ran=len(todo), blocks=n_blocks,
                    seconds=time.perf_counter() - t0)

    def _map(self, blocks: list[list[Row]]) -> None:
        import ray
        import ray.data

        if not ray.is_initialized():
            ray.init()
        items = []
        for b in blocks:
            items.append({"block": block_name(r.key for r in b),
                          "rows": json.dumps([dataclasses.asdict(r) for r in b])})
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        remote = dict(max_restarts=-1, max_task_retries=-1)
        remote.update(self.ray_remote_args)
        ds = ds.map_batches(
            self.predictor, batch_size=1, concurrency=min(self.num_actors, len(items)),
            num_gpus=self.num_gpus_per_actor or None, num_cpus=self.num_cpus_per_actor,
            fn_constructor_kwargs=dict(model=self.model, engine_kwargs=self.engine_kwargs,
                                       defaults=self.defaults, store_dir=self.store.root,
                                       model_name=self.model_name()),
            **remote)
        n = 0
        for rec in ds.iter_rows():
            n += int(rec["num_rows"])
        print(f"ray: {len(items)} blocks, {n} rows done", file=sys.stderr, flush=True)
