"""RUN_DIR/learning_curve.png: train loss and the dev metric per epoch, redrawn after every epoch."""
from __future__ import annotations

from pathlib import Path


def plot_learning_curve(history: list[dict], metric_name: str, path: Path) -> None:
    """history: metrics.jsonl entries ({"epoch", "train_loss", "dev": {metric_name: ...}})."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in any process
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, loss_axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    loss_axis.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    metric_axis = loss_axis.twinx()
    metric_axis.plot(epochs, [h["dev"][metric_name] for h in history], "s-", color="tab:orange",
                     label=f"dev {metric_name}")
    metric_axis.set_ylabel(f"dev {metric_name}", color="tab:orange")
    metric_axis.set_ylim(0, 1.02)
    loss_axis.set_xticks(epochs)
    fig.suptitle("learning curve")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
