"""The figure a run is reviewed by: train and validation loss against tokens on one chart, HellaSwag (both
protocols) against tokens beside it, with the published references (eval/references.py) as dashed lines where
they apply. Drawn from metric records (metrics.jsonl's lines, or one checkpoint's scores), without pyplot, so it
draws in any thread of any process."""

from __future__ import annotations

import io

from eval.hellaswag import ACC, ACC_NORM, COMPLETION_ACC, COMPLETION_ACC_NORM
from eval.references import MODEL
from eval.val_loss import VAL_LOSS

TRAIN_LOSS, TOKENS = "train/loss", "tokens"
FILE = "training_curves.png"  # its name in the run directory and among the MLflow run's artifacts
_HELLASWAG = ((ACC, "acc [harness]"), (ACC_NORM, "acc_norm [harness]"), (COMPLETION_ACC, "acc [completion]"),
              (COMPLETION_ACC_NORM, "acc_norm [completion]"))


def draw(records: list[dict], references: dict[str, float], title: str, hellaswag_label: str):
    """A matplotlib Figure from records ({"tokens": n, metric: value, ...}, any order); references: the
    published values (by metric name) to draw as dashed lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    loss, swag = fig.subplots(1, 2)
    records = sorted((r for r in records if TOKENS in r), key=lambda r: r[TOKENS])

    def series(key: str) -> tuple[list, list]:
        points = [(r[TOKENS], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    x, y = series(TRAIN_LOSS)
    if x:
        loss.plot(x, y, color="tab:blue", linewidth=1, alpha=0.8, label="train loss")
    x, y = series(VAL_LOSS)
    if x:
        loss.plot(x, y, color="tab:orange", marker="o", label="val loss")
    _reference(loss, references.get(VAL_LOSS), "val loss")
    loss.set(title="loss", xlabel="tokens", ylabel="cross-entropy (nats)")
    for (key, label), color in zip(_HELLASWAG, ("tab:green", "tab:red", "tab:purple", "tab:brown")):
        x, y = series(key)
        if x:
            swag.plot(x, y, color=color, marker="o", label=label)
        _reference(swag, references.get(key), label, color)
    swag.axhline(0.25, color="grey", linewidth=0.8, linestyle=":", label="chance (1 in 4)")
    swag.set(title=hellaswag_label, xlabel="tokens", ylabel="accuracy")
    for ax in (loss, swag):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def _reference(ax, value: float | None, what: str, color: str = "black") -> None:
    if value is not None:
        ax.axhline(value, color=color, linewidth=1, linestyle="--", label=f"{MODEL} {what} {value:.4f}")


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
