"""Plot a bench_attention.py JSON: per-layer decode time by method, and Twilight's stage breakdown.

Usage: python benchmarks/plot_attention.py benchmarks/results/bench_attention_h100.json
(writes the PNG beside the JSON). Needs matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("flashinfer", "quest-1024", "quest-8192", "twilight")
STAGES = ("store", "select", "prune", "attend")


def main(path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(path).read_text())
    rows = res["rows"]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts) + 1, figsize=(4.2 * (len(contexts) + 1), 3.8))
    for ax, ctx in zip(axes, contexts):
        for m in METHODS:
            pts = sorted((r["batch"], r["ms"]) for r in rows if r["context"] == ctx and r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_title(f"context {ctx // 1024}k")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per layer (median, CUDA graph)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    st = [s for s in res.get("stages", []) if s["context"] == contexts[-1]]
    st.sort(key=lambda s: s["batch"])
    bottom = [0.0] * len(st)
    labels = [str(s["batch"]) for s in st]
    for name in STAGES:
        vals = [s.get(name, 0.0) for s in st]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_title(f"twilight stages, context {contexts[-1] // 1024}k")
    ax.set_xlabel("batch")
    ax.set_ylabel("ms (each stage timed alone)")
    ax.legend(fontsize=8)
    fig.suptitle(f"{res['card']} - Llama-3.1-8B layer shapes, bf16", fontsize=10)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
