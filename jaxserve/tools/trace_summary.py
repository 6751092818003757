"""Summarise a JAX device trace as text (no TensorBoard): GPU busy time, time per compiled
program (XLA module) and per kernel, grouped into attention / matmul / other. Used by
`scripts/profile_engine.py` (engine runs) and `scripts/bench_attention.py` (kernel breakdown)."""
from __future__ import annotations

import collections
import glob
import os


def category(name: str) -> str:
    n = name.lower()
    # cuDNN's flash attention kernels: "...sdpa...flash_fprop_wgmma..." (packed prefix segments)
    if any(x in n for x in ("attention", "paged", "pallas", "flash", "fmha", "sdpa")) or (
            "_kernel" in n and "gemm" not in n):
        return "attention"
    if any(x in n for x in ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul", "dot")):
        return "matmul"
    return "other"


def union_ns(intervals) -> float:
    tot, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                tot += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        tot += cur_e - cur_s
    return tot


def summarise(trace_dir: str, top: int, events: bool = False) -> dict:
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    pd = ProfileData.from_file(files[-1])
    kernels = collections.defaultdict(lambda: [0.0, 0])
    modules = collections.defaultdict(lambda: [0.0, 0])
    intervals = []
    lines_seen = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = list(line.events)
            lines_seen.append((plane.name, line.name, len(evs)))
            if "Module" in line.name:
                for e in evs:
                    modules[e.name][0] += e.duration_ns
                    modules[e.name][1] += 1
            elif line.name.startswith("Stream") or "stream" in line.name.lower():
                for e in evs:
                    if "memcpy" in e.name.lower() or "memset" in e.name.lower():
                        key = "[" + e.name.split()[0] + "]"
                    else:
                        key = e.name
                    kernels[key][0] += e.duration_ns
                    kernels[key][1] += 1
                    intervals.append((e.start_ns, e.end_ns, key))
    span = (max(e for _, e, _ in intervals) - min(s for s, _, _ in intervals)) if intervals else 0.0
    busy = union_ns([(s, e) for s, e, _ in intervals])
    cats = collections.defaultdict(float)
    for k, (ns, _) in kernels.items():
        cats[category(k)] += ns
    total_k = sum(ns for ns, _ in kernels.values()) or 1.0
    out = dict(lines=lines_seen, gpu_span_s=span / 1e9, gpu_busy_s=busy / 1e9,
               kernel_total_s=total_k / 1e9,
               categories={k: v / 1e9 for k, v in sorted(cats.items(), key=lambda x: -x[1])},
               modules=[(k, v[0] / 1e9, v[1]) for k, v in
                        sorted(modules.items(), key=lambda x: -x[1][0])[:top]],
               kernels=[(k[:120], v[0] / 1e9, v[1]) for k, v in
                        sorted(kernels.items(), key=lambda x: -x[1][0])[:top]])
    out["gaps"] = idle_gaps(intervals, top)
    if events:   # every kernel / copy on the GPU streams, in time order: (start_ns, end_ns, name)
        out["events"] = sorted(intervals)
    return out


def idle_gaps(intervals, top: int) -> dict:
    """Where the GPU stood idle: total idle seconds by gap size, and the largest gaps with the
    kernel that ended before each and the one that started after (which tells a host wait
    between steps from one inside a program)."""
    evs = sorted(intervals)
    if not evs:
        return {}
    t0 = evs[0][0]
    buckets = {"<10us": 0.0, "10-100us": 0.0, "0.1-1ms": 0.0, "1-10ms": 0.0, ">10ms": 0.0}
    counts = dict.fromkeys(buckets, 0)
    big = []
    end, last = evs[0][1], evs[0][2]
    for s, e, name in evs[1:]:
        if s > end:
            g = s - end
            b = ("<10us" if g < 1e4 else "10-100us" if g < 1e5 else "0.1-1ms" if g < 1e6
                 else "1-10ms" if g < 1e7 else ">10ms")
            buckets[b] += g / 1e9
            counts[b] += 1
            big.append((g, end - t0, last, name))
        if e >= end:
            end, last = e, name
    big.sort(reverse=True)
    return dict(seconds=buckets, counts=counts,
                largest=[dict(ms=g / 1e6, at_s=at / 1e9, after=a[:80], before=b[:80])
                         for g, at, a, b in big[:top]])
