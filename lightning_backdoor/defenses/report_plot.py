"""A bar chart of a defense report (before / after edit / after repair), for people who do not use W&B."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_backdoor.defenses.report import EXTRA_METRICS, METRIC_TITLES, STAGE_TITLES
from lightning_backdoor.evaluation import METRIC_NAMES

#: Plotted when present: the report's metrics, then the mirrored trigger's ASR and the estimated trigger's success
#: (the true ASR unmeasured).
PLOTTED = (*METRIC_NAMES, *EXTRA_METRICS)
COLOURS = {"before": "#c0392b", "after_edit": "#f0ad4e", "after": "#2e86c1"}


def plot_report(report: Mapping[str, Any]) -> Figure:
    """Grouped bars, in %, of each metric the report holds, one bar per stage; the title names the defense (and says
    when the true ASR was not measured).

    Uses a bare ``Figure`` (no pyplot), so it needs no display and leaves global state alone.
    """
    stages = [stage for stage in STAGE_TITLES if stage in report]
    metrics = [name for name in PLOTTED if isinstance(report[stages[0]].get(name), float)]
    figure = Figure(figsize=(1.6 * len(metrics) + 2, 3.6), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(stages)
    for offset, stage in enumerate(stages):
        values = [100 * report[stage][name] for name in metrics]
        positions = [index + (offset - (len(stages) - 1) / 2) * width for index in range(len(metrics))]
        title = STAGE_TITLES[stage]
        if stage == "after" and report.get("defense", {}).get("repaired") is False:
            title = "after (no repair applied)"  # the same weights as after the edit
        bars = axes.bar(positions, values, width, label=title, color=COLOURS[stage])
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(range(len(metrics)), [METRIC_TITLES[name] for name in metrics])
    axes.set_ylabel("%")
    axes.set_ylim(0, 112)
    axes.legend(loc="upper center", ncols=len(stages), fontsize=8, frameon=False)
    defense = report.get("defense", {})
    details = [str(defense.get("method", "defense")), f"layer {defense['layer']}" if defense.get("layer") else "",
               f"{defense['num_unseen']} unseen images" if "num_unseen" in defense else "",
               f"DER {report['der']:.3f}" if isinstance(report.get("der"), float) else "",
               "true ASR not measured" if report.get("true_asr_measured") is False else ""]
    axes.set_title(", ".join(detail for detail in details if detail), fontsize=9)
    return figure


def save_report_plot(report: Mapping[str, Any], path: str | Path) -> None:
    """Write :func:`plot_report` as a PNG to ``path`` (any name: the format is fixed, not guessed from it)."""
    plot_report(report).savefig(path, format="png", dpi=120)
