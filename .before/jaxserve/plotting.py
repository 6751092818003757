"""PNG of a run's per-step token fill and throughput over time (matplotlib, optional)."""
from __future__ import annotations

from typing import Optional


def plot_trace(trace, path: str, title: str) -> Optional[str]:
    """`trace`: (seconds since start, tokens computed, tokens generated, padded tokens) per host step.
    Returns the path, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not trace:
        return None
    t = [x[0] for x in trace]
    fill = [x[1] / x[3] if x[3] else 0 for x in trace]
    dts = [t[0]] + [b - a for a, b in zip(t, t[1:])]
    tput = [x[1] / dt if dt > 0 else 0 for x, dt in zip(trace, dts)]
    fig, ax = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax[0].plot(t, fill, lw=0.8)
    ax[0].set_ylabel("token fill")
    ax[0].set_ylim(0, 1.05)
    ax[1].plot(t, tput, lw=0.8)
    ax[1].set_ylabel("tokens/s per step")
    ax[1].set_xlabel("seconds")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
