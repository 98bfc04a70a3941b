"""Training curves as files: TensorBoard event files and a small PNG loss plot (Pillow only).

Both are written from a stage's `history` when the stage finishes, so a resumed run's curves are
complete (the history travels inside every checkpoint) and identical to an uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48
COLOURS = {"train_loss": (31, 119, 180), "eval_loss": (214, 39, 40)}


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


def loss_curve_png(history: list[dict], path: Path, title: str = "MLM loss") -> Path:
    """Plot train (blue) and eval (red) loss against step into a PNG file."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    series = {name: [(h["step"], h[name]) for h in history if name in h] for name in COLOURS}
    points = [p for values in series.values() for p in values]
    draw.text((MARGIN, 12), title, fill="black")
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 16, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    if not points:
        draw.text((left + 8, top + 8), "no steps logged", fill="black")
        image.save(path)
        return path
    max_step = max(step for step, _ in points) or 1
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (right - left) * step / max_step, bottom - (bottom - top) * (value - low) / span)

    for name, values in series.items():
        if len(values) > 1:
            draw.line([xy(*p) for p in values], fill=COLOURS[name], width=2)
        for point in values:
            x, y = xy(*point)
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=COLOURS[name])
    draw.text((left, bottom + 6), "step 0", fill="black")
    draw.text((right - 70, bottom + 6), f"step {max_step}", fill="black")
    draw.text((4, top), f"{high:.2f}", fill="black")
    draw.text((4, bottom - 10), f"{low:.2f}", fill="black")
    draw.text((right - 150, 12), "train", fill=COLOURS["train_loss"])
    draw.text((right - 100, 12), "eval", fill=COLOURS["eval_loss"])
    image.save(path)
    return path
