"""Plots of a whole run for the UI metadata: loss curves across stages and JGLUE scores per model.

Both return PNG bytes (matplotlib, Agg; see `training.curves.figure_png`): identical inputs give
identical bytes, and each stays well under 60 kB so that it can be inlined in Dagster metadata.
"""

from __future__ import annotations

import math

from tinyplm_lib.evaluation.card import JCQA_CHANCE, JGLUE_METRICS, REFERENCE_NAME, REFERENCE_SCORES
from tinyplm_lib.training.curves import figure_png, new_figure, plot_losses, style_loss_axes

# One colour per model, in the order the scores are given (stage1, stage2, control, ...).
MODEL_COLOURS = ("tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:purple")


def stage_curves_png(histories: dict[str, list[dict]]) -> bytes:
    """Train and eval loss of every stage on one axis, steps continuing from stage to stage.

    `histories` maps a stage name to its `metrics.json` history, in training order. Stage 2 starts
    at its own step 0, so its steps are drawn after stage 1's last; a dashed line marks where each
    stage starts. One axis rather than one panel per stage: the loss levels compare at a glance
    (stage 2's eval loss is on its own corpus's validation set, so a jump at the line is expected).
    """
    figure = new_figure()
    axes = figure.add_subplot()
    offset = 0
    for index, (name, history) in enumerate(histories.items()):
        if index:
            axes.axvline(offset, color="black", linestyle="--", linewidth=0.8)
        axes.annotate(name, xy=(offset, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                      textcoords="offset points", fontsize=8)
        offset = plot_losses(axes, history, step_offset=offset, label=index == 0)
    style_loss_axes(axes, "MLM loss by stage")
    return figure_png(figure)


def _check_scores(scores: dict[str, dict[str, float]]) -> None:
    for model, values in scores.items():
        for key, value in values.items():
            if key not in JGLUE_METRICS:
                raise ValueError(f"scores[{model!r}]: unknown metric {key!r}; expected one of {list(JGLUE_METRICS)}")
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"scores[{model!r}][{key!r}]: expected a finite number, got {value!r}")


def jglue_scores_png(scores: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: one group per JGLUE metric, one bar per model, the published scores as lines.

    `scores` maps a model name ("stage1", "stage2", "control", ...) to its dev scores under the
    keys of `card.JGLUE_METRICS` (JSTS Pearson and Spearman, JCommonsenseQA accuracy); a metric a
    model lacks is left out of its group. Tohoku BERT base's published dev scores are drawn as a
    dashed black line over each group, JCommonsenseQA's chance (0.2) as a dotted grey one.
    """
    _check_scores(scores)
    figure = new_figure()
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(scores))
    for group, key in enumerate(JGLUE_METRICS):
        left, right = group - 0.45, group + 0.45
        axes.hlines(REFERENCE_SCORES[key], left, right, colors="black", linestyles="--", linewidth=1.0,
                    label=REFERENCE_NAME if group == 0 else None)
        if key == "jcqa_accuracy":
            axes.hlines(JCQA_CHANCE, left, right, colors="tab:gray", linestyles=":", linewidth=1.2, label="chance")
    for index, (model, values) in enumerate(scores.items()):
        colour = MODEL_COLOURS[index % len(MODEL_COLOURS)]
        positions = [g - 0.4 + width * (index + 0.5) for g, key in enumerate(JGLUE_METRICS) if key in values]
        heights = [values[key] for key in JGLUE_METRICS if key in values]
        bars = axes.bar(positions, heights, width=width * 0.9, color=colour, label=model)
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axes.set_xticks(range(len(JGLUE_METRICS)), [metric.label for metric in JGLUE_METRICS.values()])
    low = min([0.0] + [v for values in scores.values() for v in values.values()])
    axes.set_ylim(low - 0.05 if low < 0 else 0.0, 1.0)
    axes.set_ylabel("dev score")
    axes.set_title("JGLUE dev scores", fontsize=10)
    axes.grid(True, axis="y", linewidth=0.5, alpha=0.5)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_png(figure)
