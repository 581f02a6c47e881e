"""The NLL-vs-position plot (log x), every checkpoint on one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainer.evaluate import log_binned


def plot_curves(result: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in result["models"].items():
        x, y = log_binned(np.asarray(m["curve"]))
        ax.plot(x, y, label=f"{name} ({m['mean_nll']:.3f})", linewidth=1.6)
    k = result.get("window")
    if k and k < result["seq_len"]:
        ax.axvline(k, color="grey", linestyle="--", linewidth=1)
        ax.text(k, ax.get_ylim()[1], " window", va="top", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("position in the window (all earlier tokens are from the same document)")
    ax.set_ylabel("NLL (nats/token), mean over log-spaced bins")
    ax.set_title(title or f"per-position NLL, {result['sequences']} validation windows, T={result['seq_len']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
