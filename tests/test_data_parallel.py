"""Data parallelism by prefix subtree (issue #15): the partition's balance and grouping (no model),
and DP = 2 / 4 engines on 8 fake CPU devices, in subprocesses whose XLA_FLAGS are set before
JAX starts (the rest of the suite keeps one device)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxserve.scheduler.partition import CostModel, WorkItem, partition
from jaxserve.weights.presets import load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COST = CostModel.for_model(load_preset("llama-3-8b"))


def fake_devices_env(n: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    return env


def groups_items(rng, n_groups, vocab=32000):
    items, group = [], []
    for g in range(n_groups):
        prefix = [1000 + g] + rng.integers(0, vocab, int(rng.integers(20, 600))).tolist()
        for _ in range(int(rng.integers(2, 24))):
            items.append(WorkItem(prefix + rng.integers(0, vocab, int(rng.integers(4, 80))).tolist(),
                                  int(rng.integers(1, 300))))
            group.append(g)
    return items, group


@pytest.mark.parametrize("m", [2, 4, 8])
def test_partition_balances_64_groups_and_keeps_each_on_one_replica(m):
    items, group = groups_items(np.random.default_rng(m), 64)
    p = partition(items, m, cost=COST)
    assert sorted(i for part in p.parts for i in part) == list(range(len(items)))
    mean = sum(p.costs) / m
    assert all(abs(c - mean) <= 0.10 * mean for c in p.costs), p.costs
    rep = p.replica_of()
    for g in range(64):
        assert len({rep[i] for i, gi in enumerate(group) if gi == g}) == 1, g
    assert p.split_groups == 0 and p.duplicated_prefix_tokens == 0


def test_partition_cost_counts_a_shared_prefix_once():
    cm = CostModel(flops_per_token=1.0, kv_bytes_per_token=1.0, peak_flops=1.0, hbm_bandwidth=10.0)
    a = [WorkItem([1] * 50 + [2, k], 4) for k in range(3)]           # 51 shared + 1 own each
    b = [WorkItem([7] * 30 + [k, 5, 5], 2) for k in range(2)]        # 30 shared + 3 own each
    p = partition(a + b, 2, cost=cm)
    assert sorted(p.parts) == [[0, 1, 2], [3, 4]]

    def own(it, shared):
        n, d = len(it.prompt_ids), it.max_tokens
        return (n - shared) + d + (n * d + d * d / 2) / 10.0

    want = {0: 51 + sum(own(x, 51) for x in a), 3: 30 + sum(own(x, 30) for x in b)}
    for part, cost in zip(p.parts, p.costs):
        assert cost == pytest.approx(want[part[0]])


def test_partition_splits_only_a_group_too_big_for_one_replica():
    """A system prompt shared by everything must be split (its prefix then runs on each replica,
    counted); beside it, small groups stay whole."""
    rng = np.random.default_rng(1)
    system = [5] + rng.integers(0, 32000, 800).tolist()
    items = [WorkItem(system + rng.integers(0, 32000, 30).tolist(), 64) for _ in range(120)]
    small, group = groups_items(rng, 6)
    p = partition(items + small, 4, cost=COST)
    assert p.split_groups == 1
    assert p.duplicated_prefix_tokens == 3 * len(system)        # on all 4 replicas, once each
    assert p.imbalance < 0.05
    rep = p.replica_of()
    for g in range(6):
        assert len({rep[len(items) + i] for i, gi in enumerate(group) if gi == g}) == 1
    # Unshareable items (prompt logprobs) are single units; empty prompts cost nothing.
    q = partition([WorkItem(system, 4, shareable=False)] * 3 + [WorkItem([], 4)], 2, cost=COST)
    assert sorted(len(x) for x in q.parts) == [2, 2] and q.split_groups == 0


@pytest.fixture(scope="module")
def dp_results(tiny_models):
    path, _ = tiny_models["llama3"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.dp_worker", path], cwd=ROOT,
                          env=fake_devices_env(8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["seconds"] = time.perf_counter() - t0
    return res


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_outputs_equal_one_device(dp, dp_results):
    one, many = dp_results["1"], dp_results[str(dp)]
    for name in ("groups", "system"):
        assert many[name]["ids"] == one[name]["ids"]
        assert many[name]["tokens"] == one[name]["tokens"], name
        st = many[name]["stats"]
        assert st["data_parallel_size"] == dp and st["mid_run_compiles"] == 0
        assert sum(st["dp_replica_requests"]) == len(one[name]["ids"])
        assert len(st["dp_replica_wall_seconds"]) == dp
    # Each replica's weights and KV cache on its own device.
    rec = many["groups"]
    devs = [set(d) for d in rec["param_devices"]]
    assert all(len(d) == 1 for d in devs) and len({min(d) for d in devs}) == dp
    assert [min(d) for d in devs] == rec["kv_devices"]
    # Every group's requests on one replica, and prefill work as on one device.
    replica = {i: r for r, part in enumerate(rec["parts"]) for i in part}
    members = dp_results["members"]
    for g in set(members) - {-1}:
        assert len({replica[i] for i, m in enumerate(members) if m == g}) == 1, g
    st = rec["stats"]
    assert st["dp_split_groups"] == 0 and st["dp_duplicated_prefix_tokens"] == 0
    assert st["computed_prefill_tokens"] == one["groups"]["stats"]["computed_prefill_tokens"]
    assert all(n > 0 for n in st["dp_replica_requests"])


def test_dp_split_prefix_is_computed_once_per_replica_and_counted(dp_results):
    one, two = dp_results["1"]["system"], dp_results["2"]["system"]
    st = two["stats"]
    assert st["dp_split_groups"] == 1
    # The shared system prompt (the tree counts prompt[:-1]) runs once on each replica.
    assert st["dp_duplicated_prefix_tokens"] >= dp_results["system_len"]
    assert sum(two["replica_optimal"]) == (one["stats"]["optimal_prefill_tokens"]
                                           + st["dp_duplicated_prefix_tokens"])
    assert st["computed_prefill_tokens"] == sum(two["replica_optimal"])
    print(f"DP worker (8 fake devices, DP 1/2/4) took {dp_results['seconds']:.0f} s; compile s "
          f"per replica: DP=2 {dp_results['2']['groups']['stats']['dp_replica_compile_seconds']}, "
          f"DP=4 {dp_results['4']['groups']['stats']['dp_replica_compile_seconds']}")


def test_dp_run_batch_sigkill_then_resume_has_every_id_once(tiny_models, tmp_path):
    """run_batch.py --data_parallel_size=2 on 2 fake devices, SIGKILLed once results are flushed,
    then run again: every id exactly once, equal to an uninterrupted single-device run."""
    path, _ = tiny_models["llama3"]
    rng = np.random.default_rng(11)
    lines = []
    for g in range(8):
        prefix = [100 + g] + rng.integers(0, 384, 30).tolist()
        for k in range(5):
            lines.append(json.dumps({"id": f"g{g}m{k}", "max_tokens": int(rng.integers(20, 80)),
                                     "prompt_token_ids": prefix + rng.integers(0, 384, 8).tolist()}))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    args = [sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"), f"--model={path}",
            f"--input={inp}", "--max_num_batched_tokens=32", "--max_num_seqs=8",
            "--max_model_len=128", "--page_size=8", "--num_pages=64", "--use_tqdm=false",
            "--attention_impl=reference", "--page_bucket_growth=1"]
    full = tmp_path / "full.jsonl"
    subprocess.run(args + [f"--output={full}"], check=True, capture_output=True, timeout=600)

    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    dp_args = args + ["--data_parallel_size=2", f"--output={out}"]
    proc = subprocess.Popen(dp_args, env=fake_devices_env(2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        # The header and 3 whole records (a line still being written has no newline yet).
        if partial.exists() and partial.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    res = subprocess.run(dp_args, env=fake_devices_env(2), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import re

    n_done = int(re.search(r"resuming from \S+: (\d+) of 40 results reused", res.stdout).group(1))
    assert 3 <= n_done < 40
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [json.loads(x)["id"] for x in lines]
    assert recs == [json.loads(x) for x in full.read_text().splitlines()]
    stats = json.loads(res.stdout[res.stdout.index("{"):])
    assert stats["data_parallel_size"] == 2 and sum(stats["dp_replica_requests"]) == 40 - n_done


def test_dry_run_projects_the_slowest_replica_of_a_70b_job(tmp_path):
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.tools.dry_run import analyse, format_table

    cfg = load_preset("llama-3.1-70b")
    rng = np.random.default_rng(5)
    items, _ = groups_items(rng, 32, vocab=cfg.vocab_size)
    prompts = [list(it.prompt_ids) for it in items]
    params = [SamplingParams(max_tokens=it.max_tokens) for it in items]
    one = analyse(cfg, prompts, params, device="h200")
    four = analyse(cfg, prompts, params, device="h200", data_parallel_size=4)
    assert one["weights_bytes"] == four["weights_bytes"] == pytest.approx(2 * 70.55e9, rel=0.005)
    assert len(four["replica_projected_seconds"]) == 4 and sum(four["replica_requests"]) == len(items)
    assert four["projected_seconds"] == max(four["replica_projected_seconds"])
    # Each replica has a quarter of the work but reads all the weights every step: faster than
    # one device, not four times.
    assert one["projected_seconds"] / 4 < four["projected_seconds"] < one["projected_seconds"]
    assert four["memory_per_device_bytes"] < one["memory_per_device_bytes"]
    assert four["dp_split_groups"] == 0
    table = format_table(four)
    assert "data parallel replicas" in table and "slowest replica" in table
    # TP 2 x DP 4: the same replicas, each on 2 devices holding half its weights and KV.
    both = analyse(cfg, prompts, params, device="h200", data_parallel_size=4,
                   tensor_parallel_size=2)
    assert both["replica_requests"] == four["replica_requests"]
    assert both["projected_seconds"] == pytest.approx(four["projected_seconds"] / 2)
    assert both["memory_per_device_bytes"] == (
        both["weights_bytes_per_device"] + four["kv_bytes_all_at_once_per_replica"] // 2)
    assert "projected time on 8 x h200" in format_table(both)
    # The same through run_batch.py --dry_run on a preset (token-id input, no weights loaded).
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": sp.max_tokens})
                           + "\n" for i, (p, sp) in enumerate(zip(prompts, params))))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_batch.py"),
                          "--model=llama-3.1-70b", "--load_format=dummy", "--dry_run",
                          "--dry_run_device=h200", "--data_parallel_size=4", f"--input={inp}",
                          f"--output={tmp_path / 'o.jsonl'}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads((tmp_path / "o.jsonl.dryrun.json").read_text())
    assert d["projected_seconds"] == pytest.approx(four["projected_seconds"])
    assert "data parallel replicas" in res.stdout
