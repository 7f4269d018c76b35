"""A run's loss curves as a PNG (training loss per step, target validation loss at each evaluation)."""

from __future__ import annotations

from pathlib import Path


def plot_run(history: list[dict[str, float]], initial_eval: float, path: Path, title: str) -> Path:
    """history: per-step metric dicts (``train/loss``, optional ``eval/loss``); writes ``path``."""
    import matplotlib  # noqa: PLC0415 - heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy: imported when a plot is drawn

    steps = list(range(1, len(history) + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(steps, [h["train/loss"] for h in history], label="train loss (weighted selection)", lw=1.2)
    evals = [(0, initial_eval)] + [(s, h["eval/loss"]) for s, h in zip(steps, history) if "eval/loss" in h]
    ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="target validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
