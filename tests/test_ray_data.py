"""Cluster scale-out through Ray Data (issue #15): a local Ray cluster with 2 CPU actors writes the
same output file as run_batch.py on the same input, survives actors killed mid-job (nothing lost,
nothing twice) and resumes from its block store. Skipped when Ray is not installed (the
`jaxserve[ray]` extra); one Ray start for the whole module."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Data tests need the jaxserve[ray] extra "
                                        "(pip install 'ray[data]')")
pytest.importorskip("ray.data", reason="Ray Data tests need the jaxserve[ray] extra")

from jaxserve.cluster.block_store import BlockStore  # noqa: E402
from jaxserve.cluster.ray_data import RayJob, read_rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_num_batched_tokens=32", "--max_num_seqs=8", "--max_model_len=128",
        "--num_pages=64", "--page_size=8", "--attention_impl=reference", "--page_bucket_growth=1"]
TINY_KW = dict(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128, num_pages=64,
               page_size=8, attention_impl="reference", page_bucket_growth=1)
DEFAULTS = dict(max_tokens=64, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, ignore_eos=False)


def batch_lines(rng) -> list[str]:
    lines = []
    for g in range(5):
        prefix = [100 + g] + rng.integers(0, 384, 30).tolist()
        for k in range(4):
            lines.append(json.dumps({"id": f"g{g}m{k}", "max_tokens": int(rng.integers(2, 12)),
                                     "prompt_token_ids": prefix + rng.integers(0, 384, 6).tolist()}))
    for i in range(6):
        lines.append(json.dumps({"id": f"u{i}", "max_tokens": int(rng.integers(2, 12)),
                                 "prompt_token_ids": [i] + rng.integers(0, 384, 20).tolist()}))
    lines[3] = json.dumps({"id": "crash_before", "max_tokens": 5,
                           "prompt_token_ids": json.loads(lines[3])["prompt_token_ids"]})
    lines[13] = json.dumps({"id": "crash_after", "max_tokens": 5,
                            "prompt_token_ids": json.loads(lines[13])["prompt_token_ids"]})
    lines.append(json.dumps({"id": "sampled", "max_tokens": 8, "temperature": 0.9,
                             "prompt_token_ids": [7, 8, 9, 10]}))
    lines.append('{"id": "bad", "prompt_token_ids": [1], "top_p": 7}')
    return lines


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job_input(tiny_models, tmp_path_factory):
    """The input file and run_batch.py's output for it (one engine, one device)."""
    path, _ = tiny_models["llama3"]
    d = tmp_path_factory.mktemp("ray_job")
    inp = d / "in.jsonl"
    inp.write_text("\n".join(batch_lines(np.random.default_rng(2))) + "\n")
    ref = d / "ref.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"),
                           f"--model={path}", f"--input={inp}", f"--output={ref}",
                           "--use_tqdm=false", *TINY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, inp, ref.read_text()


def test_actors_killed_mid_job_lose_and_duplicate_nothing(cluster, job_input, tmp_path):
    from tests.ray_crash import CrashOncePredictor

    path, inp, ref = job_input
    out = tmp_path / "out.jsonl"
    job = RayJob(str(inp), str(out), path, TINY_KW, DEFAULTS, num_actors=2, blocks_per_actor=3,
                 keep_store=True, predictor=CrashOncePredictor)
    summary = job.run()
    # Both crashes happened (each once), and the output is run_batch's, line for line.
    assert os.path.exists(f"{job.store.root}.crashed-before")
    assert os.path.exists(f"{job.store.root}.crashed-after")
    assert summary["blocks"] >= 4 and summary["ran"] == summary["rows"] == len(read_rows(str(inp)))
    assert out.read_text() == ref
    # The keyed store holds every row exactly once, over all its block files.
    store = BlockStore(job.store.root)
    keys = [json.loads(x)["_key"] for b in store.blocks() for x in open(store.path(b))]
    assert sorted(keys) == sorted(r.key for r in read_rows(str(inp)))

    # Resume: only a lost block's rows are recomputed (re-planned into blocks), the rest is read
    # back from the store.
    lost = store.blocks()[0]
    n_lost = len(store.read(lost))
    os.unlink(store.path(lost))
    again = RayJob(str(inp), str(out), path, TINY_KW, DEFAULTS, num_actors=2).run()
    assert again["ran"] == n_lost < summary["rows"]
    assert out.read_text() == ref and not os.path.exists(store.root)


def test_script_on_a_cluster_writes_run_batch_output(cluster, job_input, tmp_path):
    path, inp, ref = job_input
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_batch_ray.py"),
                           f"--ray_address={cluster}", f"--model={path}", f"--input={inp}",
                           f"--output={out}", "--num_actors=2", *TINY],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == ref
    assert "wrote 28 results" in proc.stdout
    # Parquet input, the same rows: the same output.
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [json.loads(x) for x in inp.read_text().splitlines()]
    cols = sorted({k for r in recs for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in recs]),
                   tmp_path / "in.parquet")
    rows = read_rows(str(tmp_path / "in.parquet"))
    assert [json.loads(r.text) for r in rows] == recs
