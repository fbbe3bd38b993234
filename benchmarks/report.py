"""Write an experiment's result: JSON (everything), a markdown report and a PNG of its bar charts.

An experiment returns a payload with ``ratios`` (the headline A/B numbers), ``tables`` (``title``,
``columns``, ``rows``), ``plots`` (``title``, ``ylabel``, ``labels``, ``series``: name -> values),
``records`` (raw per-run data), ``notes`` and ``failures``. The runner adds ``env`` and timing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.common import hardware_line


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, large numbers with separators, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{digits}g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header(payload: dict[str, Any]) -> str:
    """Date, hardware, software, commit and machine load in one paragraph."""
    env = payload["env"]
    sw = env["software"]
    stack = ", ".join(f"{k} {v}" for k, v in sw.items() if v and k != "matplotlib")
    git = env["git"]
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = env.get("load_average")
    load_end = payload.get("load_average_end")
    load_text = f"{load[0]:.1f}" if load else "?"
    if load_end:
        load_text += f" at start, {load_end[0]:.1f} at end"
    return (
        f"{env['date']} · {hardware_line(env)} · {stack} · commit {commit} · "
        f"1-min load average {load_text} · wall {payload.get('wall_seconds', 0):.0f} s"
    )


def to_markdown(payload: dict[str, Any]) -> str:
    title = payload["experiment"] + (" (smoke)" if payload.get("smoke") else "")
    parts = [f"# {title}", "", payload.get("description", "").strip(), "", header(payload), ""]
    if payload.get("ratios"):
        rows = [
            [
                r["comparison"],
                r["metric"],
                r.get("value"),
                ", ".join(fmt(v) for v in r.get("per_repeat", [])) or "-",
                r.get("note", ""),
            ]
            for r in payload["ratios"]
        ]
        parts += [
            "## Ratios",
            "",
            markdown_table(["A / B", "metric", "median", "per repeat", "note"], rows),
            "",
        ]
    for table in payload.get("tables", []):
        parts += [f"## {table['title']}", "", markdown_table(table["columns"], table["rows"]), ""]
        if table.get("caption"):
            parts += [table["caption"], ""]
    if payload.get("failures"):
        parts += ["## What did not run", ""]
        parts += [f"- **{f['variant']}**: {f['reason']}" for f in payload["failures"]]
        parts.append("")
    if payload.get("notes"):
        parts += ["## Notes", ""] + [f"- {note}" for note in payload["notes"]] + [""]
    return "\n".join(parts)


def write_plots(payload: dict[str, Any], path: Path) -> str | None:
    """Bar charts of ``payload["plots"]`` into one PNG; returns why not when matplotlib is missing."""
    plots = [p for p in payload.get("plots", []) if p.get("labels")]
    if not plots:
        return "no plots for this experiment"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); plots skipped"
    fig, axes = plt.subplots(1, len(plots), figsize=(5.5 * len(plots), 4.2), squeeze=False)
    for ax, plot in zip(axes[0], plots, strict=True):
        labels, series = plot["labels"], plot["series"]
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30 if max(len(str(x)) for x in labels) > 8 else 0, ha="right")
        ax.set_title(plot["title"], fontsize=10)
        ax.set_ylabel(plot.get("ylabel", ""))
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{payload['experiment']} · {payload['env']['date'][:10]} · {hardware_line(payload['env'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_results(payload: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """``<experiment>[-smoke]-<YYYYmmdd-HHMMSS>.{json,md,png}`` under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = payload["env"]["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
    stem = f"{payload['experiment']}{'-smoke' if payload.get('smoke') else ''}-{stamp}"
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    png = out_dir / f"{stem}.png"
    skipped = write_plots(payload, png)
    if skipped is None:
        paths["png"] = png
    else:
        payload.setdefault("notes", []).append(f"plots: {skipped}")
    paths["markdown"].write_text(to_markdown(payload))
    payload["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    return {k: str(v) for k, v in paths.items()}
