"""The evaluation report: report.json (numbers), report.md (a table), per-class IoU bars and the confusion matrix.

Every file is written atomically and report.json last, after the plots and the table: a run interrupted
before the end leaves no half-written report, and a report.json present means the report is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from converter.atomic import write_atomic
from segmentation.metrics import Scores

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
IOU_PNG = "per_class_iou.png"
CONFUSION_PNG = "confusion_matrix.png"


def report_data(scores: Scores, names: list[str], matrix: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: top-level fractions, `per_class` in class order (None = undefined, see metrics)."""
    return {
        "miou": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "mean_accuracy": scores.mean_accuracy,
        "fwiou": scores.fwiou,
        "per_class": [
            {"name": name, "iou": iou, "accuracy": accuracy}
            for name, iou, accuracy in zip(names, scores.iou, scores.accuracy)
        ],
        "absent_classes": [names[c] for c in scores.absent],
        "pixels": scores.pixels,
        "confusion_matrix": matrix.astype(np.int64).tolist(),
        **meta,
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def report_markdown(data: dict[str, Any]) -> str:
    """A readable summary of `report_data`'s dict."""
    lines = [
        "# Evaluation report",
        "",
        f"- source: {data.get('source', 'unknown')}",
        f"- parity: {data.get('parity', 'n/a')}",
        f"- images: {data.get('images', 'n/a')}, labelled pixels: {data['pixels']}",
        f"- protocol: {data.get('protocol', 'n/a')}",
        "",
        "| metric | % |",
        "|---|---|",
        f"| mIoU | {_percent(data['miou'])} |",
        f"| pixel accuracy | {_percent(data['pixel_accuracy'])} |",
        f"| mean accuracy | {_percent(data['mean_accuracy'])} |",
        f"| frequency-weighted IoU | {_percent(data['fwiou'])} |",
        "",
        "| class | IoU % | accuracy % |",
        "|---|---|---|",
    ]
    lines += [f"| {row['name']} | {_percent(row['iou'])} | {_percent(row['accuracy'])} |" for row in data["per_class"]]
    if data["absent_classes"]:
        lines += ["", f"Absent from ground truth and predictions (left out of the means): {', '.join(data['absent_classes'])}."]
    lines += ["", f"![per-class IoU]({IOU_PNG})", "", f"![normalised confusion matrix]({CONFUSION_PNG})", ""]
    return "\n".join(lines)


def _save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(figure)


def plot_iou(names: list[str], iou: list[float | None], path: Path) -> None:
    """Horizontal bars of per-class IoU (%); undefined classes drawn as an empty row marked n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 0.3 * len(names) + 1))
    values = [0.0 if v is None else 100 * v for v in iou]
    axes.barh(range(len(names)), values, color="tab:blue")
    for row, value in enumerate(iou):
        axes.text(1 if value is None else 100 * value + 1, row, "n/a" if value is None else f"{100 * value:.1f}",
                  va="center", fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0, 110)
    axes.set_xlabel("IoU (%)")
    _save_figure(figure, path)


def plot_confusion(names: list[str], matrix: np.ndarray, path: Path) -> None:
    """The confusion matrix with each ground-truth row normalised to sum 1 (rows without pixels left at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 0.3 * len(names) + 2
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(normalised, vmin=0, vmax=1, cmap="viridis")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes.set_yticks(range(len(names)), names, fontsize=6)
    axes.set_xlabel("predicted")
    axes.set_ylabel("ground truth")
    figure.colorbar(image, ax=axes, fraction=0.046)
    _save_figure(figure, path)


def write_report(out: Path, scores: Scores, names: list[str], matrix: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the plots, report.md, then report.json into `out` (created if needed); returns the JSON data."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).unlink(missing_ok=True)  # an older report.json must not vouch for half-replaced plots
    data = report_data(scores, names, matrix, meta)
    plot_iou(names, scores.iou, out / IOU_PNG)
    plot_confusion(names, matrix, out / CONFUSION_PNG)
    write_atomic(out / REPORT_MD, lambda temporary: temporary.write_text(report_markdown(data), encoding="utf-8"))
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(out / REPORT_JSON, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return data
