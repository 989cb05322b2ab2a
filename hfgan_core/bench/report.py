"""The quality bench's report: `report.md` (for people), `report.json` (the same numbers), plots and sample grids.

Every sentence in the "Answers" section is generated from the numbers (answers.py): each question gets yes/no with
both values and the difference, and each of the paper's headline claims gets a verdict (holds / holds partly / does
not hold at this scale) with the measured ratio or gain. Nothing is hidden when a claim fails. report.md is rendered
section by section from report.json's content (report_md.py), so a committed report.json reproduces its report.md.
"""

from __future__ import annotations

import datetime as _dt
import io
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..evaluation import plot_scores, write_bytes_atomic, write_json_atomic
from .answers import accuracy, claims, compare, final_score, questions
from .methods import REGISTRY, label
from .report_md import PAPER_ACCURACY, fmt, markdown

NAMES = {m.name: m.label for m in REGISTRY}


def plot_accuracy(results: dict[str, Any], domains: list[str], path: Path) -> Path:
    """Grouped bars: utility accuracy per domain (groups) and method (bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.4, 1.6 * len(domains) + 3) + 2.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(results)
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(domains))]
        ys = [accuracy(results[m], d) or 0.0 for d in domains]
        ax.bar(xs, ys, width=width, label=label(m))
    ax.set_xticks(range(len(domains)))
    ax.set_xticklabels(domains)
    ax.set_ylabel("utility accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Utility: classifier trained on generated data, tested on real data")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside the bars
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# The report


def _scenario_rows(cfg: RunConfig, data: Any, results: dict[str, Any]) -> list[dict[str, Any]]:
    names = cfg.devices.client_profile_names(cfg.scenario.total_clients)
    rows = []
    for s in data.shards:
        row = {
            "client": s.client,
            "domain": s.dataset,
            "samples": s.size,
            "excluded_labels": list(s.excluded_labels),
            "device": names[s.client],
        }
        for m in REGISTRY:
            if m.role.cuts_column and m.name in results:
                row[f"cuts_{m.name}"] = (results[m.name].get("cuts") or {}).get(str(s.client))
        rows.append(row)
    return rows


def write_plots(out: Path, domains: list[str], results: dict[str, Any]) -> dict[str, str]:
    """Generation score per round for each domain, and the utility accuracy bars; paths relative to `out`."""
    plots: dict[str, str] = {}
    for d in domains:
        hist = {label(m): r["domains"][d]["history"] for m, r in results.items() if d in r.get("domains", {})}
        p = plot_scores(hist, out / "plots" / f"generation_score_{d}.png", title=f"{d}: generation score per round")
        plots[f"generation_score_{d}"] = str(p.relative_to(out))
    if results:
        plots["utility_accuracy"] = str(
            plot_accuracy(results, domains, out / "plots" / "utility_accuracy.png").relative_to(out)
        )
    return plots


def write_report(
    out: Path,
    *,
    cfg: RunConfig,
    paper: RunConfig,
    data: Any,
    results: dict[str, Any],
    factors: list[dict[str, Any]],
    choice: dict[str, Any],
    settings: Any,
    machine: dict[str, Any],
    digest: str,
) -> dict[str, Any]:
    """Write report.md, report.json and the plots under `out`; returns report.json's content."""
    domains = list(cfg.scenario.domain_names)
    plots = write_plots(out, domains, results)
    report = {
        "bench": "quality",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": settings.command,
        "digest": digest,
        "machine": machine,
        "scenario": {
            "name": cfg.scenario.name,
            "distribution": cfg.scenario.distribution,
            "domains": [
                {"dataset": d.dataset, "clients": d.clients, "samples_per_client": d.samples_per_client}
                for d in cfg.scenario.domains
            ],
            "clients": _scenario_rows(cfg, data, results),
            "data_sources": data.sources,
            "data_digests": data.digests,
            "notices": list(data.notices),
        },
        "paper_scale": bool(settings.paper_scale),
        "scale_factors": factors,
        "scale_choice": choice,
        "config": cfg.to_dict(include_runtime=False),
        "methods": results,
        "answers": questions(results, domains, "headline"),
        "more_answers": questions(results, domains, "further"),
        "claims": claims(results, domains),
        "plots": plots,
    }
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(markdown(report, cfg))
    return report


def summary_table(rep: dict[str, Any]) -> str:
    """A plain-text table for the terminal: per method and domain, the final generation score and accuracy."""
    domains = [d["dataset"] for d in rep["scenario"]["domains"]]
    head = f"{'method':<32}" + "".join(f"{d + ' score':>22}{d + ' acc %':>22}" for d in domains)
    lines = [head]
    for m, r in rep["methods"].items():
        cells = "".join(f"{fmt(final_score(r, d)):>22}{fmt(accuracy(r, d)):>22}" for d in domains)
        lines.append(f"{label(m):<32}{cells}")
    return "\n".join(lines)


__all__ = [
    "NAMES",
    "PAPER_ACCURACY",
    "claims",
    "compare",
    "markdown",
    "plot_accuracy",
    "summary_table",
    "write_plots",
    "write_report",
]
