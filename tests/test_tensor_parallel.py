"""Issue #15: tensor parallelism and multi-host.

Here, on the suite's one CPU device: the per-shard layout of the fused columns, the errors for a
model or a machine that cannot be split, the dry run's per-device projection. In subprocesses:
tests/tp_multidevice.py on 8 CPU devices (XLA_FLAGS set before JAX starts there only), and two
processes joined by `jax.distributed.initialize` running one TP = 2 model through
scripts/run_batch.py, against one process.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.models.llama import tp_column_order
from jaxserve.runner import mesh as mesh_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fused_columns_are_laid_out_per_shard():
    """Shard i's contiguous block of qkv_proj is [its q heads | its k heads | its v heads]; of
    gate_up_proj [its gate | its up] columns."""
    cfg = ModelConfig(num_heads=8, num_kv_heads=4, head_dim=2, hidden_size=16,
                      intermediate_size=6, vocab_size=32, num_layers=1)
    # Label each fused column by (part, head): q 0-7, k 10-13, v 20-23.
    labels = np.concatenate([np.repeat(np.arange(8), 2), np.repeat(10 + np.arange(4), 2),
                             np.repeat(20 + np.arange(4), 2)])
    blocks = labels[tp_column_order(cfg, "qkv_proj", 2)].reshape(2, -1)
    assert blocks[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 10, 10, 11, 11, 20, 20, 21, 21]
    assert blocks[1].tolist() == [4, 4, 5, 5, 6, 6, 7, 7, 12, 12, 13, 13, 22, 22, 23, 23]
    assert (tp_column_order(cfg, "qkv_bias", 2) == tp_column_order(cfg, "qkv_proj", 2)).all()
    gu = np.arange(12)[tp_column_order(cfg, "gate_up_proj", 2)].reshape(2, -1)
    assert gu.tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    assert tp_column_order(cfg, "qkv_proj", 1) is None
    assert tp_column_order(cfg, "o_proj", 2) is None


def test_models_and_machines_that_cannot_be_split_are_clear_errors():
    cfg = ModelConfig(num_heads=8, num_kv_heads=8, intermediate_size=100, name="m")
    mesh_mod.check_tensor_parallel(cfg, 4)
    with pytest.raises(ConfigError, match="tensor_parallel_size=8 does not divide "
                                          "intermediate_size=100"):
        mesh_mod.check_tensor_parallel(cfg, 8)
    with pytest.raises(ConfigError, match="num_attention_heads=8"):
        mesh_mod.check_tensor_parallel(cfg, 3)
    with pytest.raises(ConfigError, match="num_key_value_heads=1"):
        mesh_mod.check_tensor_parallel(ModelConfig(num_heads=4, num_kv_heads=1), 2)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs 2 devices, 1 visible"):
        mesh_mod.make_mesh(2)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_dry_run_projects_per_device():
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.tools.dry_run import analyse, format_table
    from jaxserve.weights import presets

    cfg = presets.load_preset("llama-3-8b")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, 300).tolist() for _ in range(64)]
    params = [SamplingParams(max_tokens=100)] * 64
    one = analyse(cfg, prompts, params, device="h200")
    two = analyse(cfg, prompts, params, device="h200", tensor_parallel_size=2)
    assert one["weights_bytes_per_device"] == one["weights_bytes"]
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * 2
    assert two["weights_bytes_per_device"] == (one["weights_bytes"] - norms) // 2 + norms
    assert two["kv_bytes_all_at_once_per_device"] * 2 == one["kv_bytes_all_at_once"]
    assert two["kv_bytes_per_token_per_device"] * 2 == one["kv_bytes_per_token"]
    assert two["projected_seconds"] == pytest.approx(one["projected_seconds"] / 2)
    table = format_table(two)
    assert "weights per device" in table and "projected time on 2 x h200" in table
    with pytest.raises(ConfigError, match="num_key_value_heads=8"):
        analyse(cfg, prompts, params, tensor_parallel_size=16)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def test_eight_cpu_devices():
    """tests/tp_multidevice.py in a subprocess that sees 8 CPU devices."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join("tests", "tp_multidevice.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    assert re.search(r"^13 passed", res.stdout, re.M) and "skipped" not in res.stdout, tail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_split_one_model(tiny_models, tmp_path):
    """TP = 2 across two processes on localhost (one CPU device each, gloo collectives), launched
    as docs/parallel.md says: the same greedy outputs as one process; only process 0 writes."""
    from jaxserve.engine import Request
    from jaxserve.sampling_params import SamplingParams
    from tests.test_engine import make_engine

    path, _ = tiny_models["llama3"]
    rng = np.random.default_rng(4)
    prefix = rng.integers(0, 384, 21).tolist()
    lines = [{"id": f"r{i}", "prompt_token_ids": prefix + rng.integers(0, 384, 3 + 2 * i).tolist(),
              "max_tokens": 3 + i} for i in range(6)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = dict(page_size=8, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=128,
                    num_pages=64, attention_impl="reference", compilation_cache_dir="off",
                    page_bucket_growth=1, fused_decode_steps=4)
    port = _free_port()
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), f"--model={path}",
           f"--input={inp}", "--use_tqdm=false", "--tensor_parallel_size=2",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    cmd += [f"--{k}={v}" for k, v in settings.items()]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs, outs = [], []
    try:
        for i in (1, 0):
            out, err = open(tmp_path / f"stdout{i}", "w"), open(tmp_path / f"stderr{i}", "w")
            outs += [out, err]
            procs.append(subprocess.Popen(
                cmd + [f"--process_id={i}", f"--output={tmp_path / f'o{i}.jsonl'}"],
                stdout=out, stderr=err, env=env))
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in outs:
            f.close()
    for i, p in zip((1, 0), procs):
        assert p.returncode == 0, (tmp_path / f"stderr{i}").read_text()[-4000:]
    stdout = (tmp_path / "stdout0").read_text()
    stats = json.loads(stdout[stdout.index("{"):])
    assert stats["tensor_parallel_size"] == 2
    assert stats["computed_prefill_tokens"] == stats["optimal_prefill_tokens"] < stats["prompt_tokens"]
    assert "wrote" not in (tmp_path / "stdout1").read_text()
    assert not (tmp_path / "o1.jsonl").exists() and not (tmp_path / "o1.jsonl.partial").exists()
    got = [json.loads(x) for x in (tmp_path / "o0.jsonl").read_text().splitlines()]
    reqs = [Request(x["id"], x["prompt_token_ids"],
                    SamplingParams(max_tokens=x["max_tokens"], temperature=0.0)) for x in lines]
    ref = make_engine(path, **settings).run(reqs)
    assert [g["token_ids"] for g in got] == [o.token_ids for o in ref]
    assert [len(g["token_ids"]) for g in got] == [x["max_tokens"] for x in lines]
