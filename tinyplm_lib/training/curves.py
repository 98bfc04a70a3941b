"""Training curves as files: TensorBoard event files and a small PNG loss plot (matplotlib, Agg).

Both are written from a stage's `history` when the stage finishes, so a resumed run's curves are
complete (the history travels inside every checkpoint) and identical to an uninterrupted run's.
`figure_png` is the one way the project turns a matplotlib figure into PNG bytes. matplotlib is
imported by `new_figure`: the Dagster code location imports the plotting modules, not their plots.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# 6.4 x 3.6 inches at 100 dpi: 640 x 360 pixels, 20-40 kB, small enough for Dagster metadata.
FIGURE_SIZE = (6.4, 3.6)
DPI = 100
COLOURS = {"train_loss": "tab:blue", "eval_loss": "tab:red"}
LABELS = {"train_loss": "train", "eval_loss": "eval"}


def new_figure(size: tuple[float, float] = FIGURE_SIZE) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so no global state and no GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes; identical figures give identical bytes.

    Matplotlib's PNG carries no timestamp, only a "Software" text chunk naming its version: dropped,
    so the bytes do not change with a matplotlib upgrade that draws the same pixels.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def plot_losses(axes, history: list[dict], step_offset: int = 0, label: bool = True) -> int:
    """Draw train and eval loss of one stage's `history` on `axes`, steps shifted by `step_offset`.

    Returns the last step drawn (shifted), or `step_offset` when the history holds no loss.
    """
    last = step_offset
    for name, colour in COLOURS.items():
        points = [(h["step"] + step_offset, h[name]) for h in history if name in h]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, color=colour, marker="o", markersize=2.5, linewidth=1.4,
                  label=LABELS[name] if label else None)
        last = max(last, steps[-1])
    return last


def style_loss_axes(axes, title: str) -> None:
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("MLM loss")
    axes.grid(True, linewidth=0.5, alpha=0.5)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8, loc="upper right")
    else:
        axes.text(0.5, 0.5, "no steps logged", transform=axes.transAxes, ha="center", va="center")


def loss_curve_bytes(history: list[dict], title: str = "MLM loss") -> bytes:
    """Train (blue) and eval (red) loss against step, with ticks and grid, as PNG bytes."""
    figure = new_figure()
    axes = figure.add_subplot()
    plot_losses(axes, history)
    style_loss_axes(axes, title)
    return figure_png(figure)


def loss_curve_png(history: list[dict], path: Path, title: str = "MLM loss") -> Path:
    """Write `loss_curve_bytes(history, title)` to `path`."""
    path = Path(path)
    path.write_bytes(loss_curve_bytes(history, title))
    return path


def write_tensorboard(history: list[dict], log_dir: Path) -> None:
    """Scalars `loss/train`, `loss/eval` and `learning_rate` by global step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for entry in history:
            if "train_loss" in entry:
                writer.add_scalar("loss/train", entry["train_loss"], entry["step"])
                writer.add_scalar("learning_rate", entry["learning_rate"], entry["step"])
            if "eval_loss" in entry:
                writer.add_scalar("loss/eval", entry["eval_loss"], entry["step"])
