"""The workload floor and its serial companion (host only)."""
import json
import os
import subprocess
import sys

import pytest

from jaxserve.scheduler.density import matmul_params
from jaxserve.tools import roofline
from jaxserve.weights import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = presets.load_preset("llama-3-8b")
PEAK, BW = 800e12, 4e12


def test_decode_only_floor_by_hand():
    """64 rows x 1-token prompts x 100 outputs, fewer rows than max_num_seqs: 100 steps; the
    floor is the larger of all FLOPs and all bytes, the serial floor the sum of the matmuls'
    and the attention's own bounds."""
    n, d = 64, 100
    fl = roofline.workload_floor(CFG, [1] * n, [d] * n, peak_flops=PEAK, hbm_bandwidth=BW,
                                 max_num_batched_tokens=4096, max_num_seqs=256)
    mm = 2.0 * matmul_params(CFG) * n * (1 + d)
    attn = 4.0 * n * d * (1 + d / 2) * CFG.num_heads * CFG.head_dim * CFG.num_layers
    weights = CFG.num_params() * 2 * d
    kv = n * d * (1 + d / 2) * CFG.kv_bytes_per_token(2)
    assert fl.flops == pytest.approx(mm + attn)
    assert fl.bytes == pytest.approx(weights + kv)
    assert fl.seconds == pytest.approx(max((mm + attn) / PEAK, (weights + kv) / BW))
    assert fl.serial_seconds == pytest.approx(max(weights / BW, mm / PEAK)
                                              + max(kv / BW, attn / PEAK))
    # 64 decode rows read the weights far longer than they multiply them: memory-bound matmuls,
    # and attention that reads KV, so nothing of the serial floor is hidden.
    assert fl.bound == "memory"
    assert fl.serial_seconds == pytest.approx((weights + kv) / BW)


def test_serial_floor_is_never_below_the_floor():
    for n, p, d, rows in [(1024, 128, 1024, 1024), (256, 2048, 16, 256), (8, 4000, 300, 8)]:
        fl = roofline.workload_floor(CFG, [p] * n, [d] * n, peak_flops=PEAK, hbm_bandwidth=BW,
                                     max_num_batched_tokens=16384, max_num_seqs=rows)
        assert fl.serial_seconds >= fl.seconds * (1 - 1e-12)
        assert fl.serial_seconds <= fl.compute_seconds + fl.memory_seconds + 1e-12


def test_refloor_reproduces_a_recorded_floor(tmp_path):
    """`scripts/refloor.py` rebuilds a committed H200 record's workload from its command and
    gets the floor the run recorded (so its serial floors are of the same work)."""
    rec = os.path.join(ROOT, "benchmarks", "results", "h200",
                       "e2e_nosharing_llama-3-8b_jaxserve_floors_callU.json")
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "refloor.py"), rec,
                    f"--out={out}"], check=True, cwd=ROOT, capture_output=True)
    (row,) = json.loads(out.read_text())
    with open(rec) as f:
        recorded = json.load(f)
    assert row["matches_record"]
    assert row["floor_seconds"] == pytest.approx(recorded["floor_seconds"])
    assert row["floor_seconds"] <= row["serial_floor_seconds"] < row["run_seconds"]
