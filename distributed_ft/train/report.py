"""Run reports: curves (PNG) and ``report.md`` from run directories' ``metrics.jsonl`` and ``results.json``.

Written at the end of every run (``track.report``, into ``RUN_DIR/report``) and by ``dft report RUN [RUN
...]`` (several runs overlaid, the legend naming each run directory). Torch-free, so ``dft report`` starts
fast; matplotlib is imported lazily and drawn with its Agg canvas (no display, no pyplot state). Without
matplotlib the report is ``report.md`` alone. ``series.json`` holds the data of every line plotted (read
back from the plotted lines), keyed like the trackers' scalars: ``train/loss``, ``eval/validation/f1``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_ft.errors import DataError

log = logging.getLogger("distributed_ft")

TRAIN_PLOTS = (
    ("loss.png", "training loss", "loss"),
    ("lr.png", "learning rate", "lr"),
    ("tokens_per_s.png", "training tokens/s", "tokens_per_s"),
)
"""``(file, title, key of the train events)`` of the training curves."""
EVAL_PLOT = "eval.png"
"""One panel per evaluation metric (the float values of the ``eval`` events) against steps."""
LABEL_COLUMNS = ("precision", "recall", "f1", "support")
REPORTS = (("per_type", "type"), ("per_class", "class"))
"""Per-label tables of ``results.json``: token classification ``per_type``, sequence classification
``per_class`` (both ``label -> precision, recall, f1, support``)."""


@dataclass
class Series:
    """One curve: ``step`` and ``value`` lists of equal length."""

    step: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`write_report` wrote: its directory, the files, and the series of each plotted curve."""

    directory: Path
    files: list[Path]
    series: dict[str, dict[str, Series]]
    """``series key -> run label -> Series`` (``train/loss`` -> ``{"run-a": Series(...)}``)."""


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events of ``run_dir/metrics.jsonl``; a torn last line (a run still writing) is skipped.

    Raises:
        DataError: there is no ``metrics.jsonl``, or a line before the last is not JSON.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl here; give a run directory (dft report RUN_DIR)")
    lines = path.read_text(encoding="utf-8").splitlines()
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                continue
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
    return events


def event_series(events: list[dict[str, Any]]) -> dict[str, Series]:
    """Each numeric value of the ``train`` and ``eval`` events as a series against steps.

    Keys are ``event/key`` (``event/split/key`` for events of a split). A step logged twice (a resumed run
    repeats the steps after its last checkpoint) keeps its last value; steps come out sorted.
    """
    by_key: dict[str, dict[int, float]] = {}
    for record in events:
        event = record.get("event")
        if event not in ("train", "eval") or not isinstance(record.get("step"), int):
            continue
        split = record.get("split")
        prefix = f"{event}/{split}" if isinstance(split, str) else event
        for key, value in record.items():
            if key in ("event", "step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                by_key.setdefault(f"{prefix}/{key}", {})[record["step"]] = value
    return {
        key: Series(sorted(points), [points[step] for step in sorted(points)])
        for key, points in by_key.items()
    }


def eval_keys(events: list[list[dict[str, Any]]]) -> list[str]:
    """The evaluation metrics to plot: float values of the runs' ``eval`` events (counts, epochs left out)."""
    return sorted(
        {
            f"eval/{record['split']}/{key}" if isinstance(record.get("split"), str) else f"eval/{key}"
            for run in events
            for record in run
            if record.get("event") == "eval"
            for key, value in record.items()
            if isinstance(value, float) and key not in ("time", "epoch")
        }
    )


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend names: each run directory's name, with its parent where two names collide."""
    names = [Path(run).resolve().name for run in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(run).resolve().parent.name}/{Path(run).resolve().name}" for run in run_dirs]


def write_report(run_dirs: list[Path], out: Path) -> Report:
    """Write the curves, ``series.json`` and ``report.md`` of ``run_dirs`` into ``out``.

    Raises:
        DataError: a run directory without ``metrics.jsonl``.
    """
    run_dirs = [Path(run) for run in run_dirs]
    events = [read_events(run) for run in run_dirs]  # every run is checked before anything is written
    labels = run_labels(run_dirs)
    per_run = {label: event_series(run_events) for label, run_events in zip(labels, events, strict=True)}
    keys = sorted({key for series in per_run.values() for key in series})
    collected = {key: {label: s[key] for label, s in per_run.items() if key in s} for key in keys}
    plots = [(name, title, [f"train/{key}"]) for name, title, key in TRAIN_PLOTS]
    plots.append((EVAL_PLOT, "evaluation", eval_keys(events)))
    plots = [(name, title, [k for k in ks if k in collected]) for name, title, ks in plots]
    plots = [plot for plot in plots if plot[2]]
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    plotted: dict[str, dict[str, Series]] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("report: plots need matplotlib (pip install matplotlib); writing report.md only")
    else:
        for name, title, plot_keys in plots:
            plotted.update(_plot(out / name, title, {key: collected[key] for key in plot_keys}))
            files.append(out / name)
    series = plotted or {key: collected[key] for _, _, ks in plots for key in ks}
    (out / "series.json").write_text(
        json.dumps({key: {run: vars(s) for run, s in runs.items()} for key, runs in series.items()}, indent=1)
    )
    results = [_read_results(run) for run in run_dirs]
    (out / "report.md").write_text(_markdown(run_dirs, labels, results, [f.name for f in files]))
    files += [out / "series.json", out / "report.md"]
    return Report(out, files, series)


def write_run_report(run_dir: Path) -> Report | None:
    """The end-of-run report in ``run_dir/report`` (``track.report``); a failure only warns."""
    try:
        report = write_report([run_dir], Path(run_dir) / "report")
    except Exception as exc:  # the run itself succeeded; the report can be rebuilt with dft report
        log.warning("report: not written (%s); rebuild it with: dft report %s", exc, run_dir)
        return None
    log.info("report: %s", report.directory / "report.md")
    return report


def _plot(path: Path, title: str, curves: dict[str, dict[str, Series]]) -> dict[str, dict[str, Series]]:
    """One PNG: a panel per series key, a line per run; returns the data of the lines drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(len(curves), 3)
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(5.5 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    drawn: dict[str, dict[str, Series]] = {}
    for index, (key, runs) in enumerate(curves.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for run, series in runs.items():
            (line,) = axes.plot(
                series.step, series.value, label=run, marker="." if len(series.step) < 50 else ""
            )
            drawn.setdefault(key, {})[run] = Series(
                [int(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]
            )
        axes.set_title(key if len(curves) > 1 else title)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if key.endswith("/lr"):
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes.legend(fontsize="small")
    if len(curves) > 1:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return drawn


def _read_results(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _rounded(value: Any, digits: int) -> str:
    """``value`` with ``digits`` decimals for a table cell (``-`` when absent)."""
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.{digits}f}"


def _markdown(
    run_dirs: list[Path], labels: list[str], results: list[dict[str, Any] | None], images: list[str]
) -> str:
    """``report.md``: the runs, the final metrics (``results.json``), per-label reports and the curves."""
    lines = ["# Run report", ""]
    run_rows = []
    for label, run, result in zip(labels, run_dirs, results, strict=True):
        result = result or {}
        speed = result.get("throughput") or {}
        memory = speed.get("peak_memory_bytes_per_rank") or []
        run_rows.append(
            [label, result.get("task", "-"), result.get("steps", "-"), result.get("best_step", "-"),
             _rounded(result.get("train_seconds"), 1), _rounded(speed.get("tokens_per_s"), 0),
             _rounded(speed.get("mfu"), 3), f"{max(memory) / 2**30:.2f}" if memory else "-", f"`{run}`"]
        )  # fmt: skip
    header = ["run", "task", "steps", "best step", "train s", "tokens/s", "MFU", "peak GiB/rank", "directory"]
    lines += _table(header, run_rows)
    unfinished = [label for label, result in zip(labels, results, strict=True) if result is None]
    if unfinished:
        lines += [f"No `results.json` (not finished): {', '.join(unfinished)}.", ""]
    final = [
        (label, split, _scalars(result[split]))
        for label, result in zip(labels, results, strict=True)
        if result
        for split in ("dev", "test")
        if isinstance(result.get(split), dict)
    ]
    if final:
        columns = list(dict.fromkeys(key for _, _, metrics in final for key in metrics))
        lines += ["## Final metrics", ""]
        lines += _table(
            ["run", "split", *columns],
            [[label, split, *(m.get(c, "") for c in columns)] for label, split, m in final],
        )
    for label, result in zip(labels, results, strict=True):
        for split in ("dev", "test"):
            metrics = (result or {}).get(split)
            if not isinstance(metrics, dict):
                continue
            for key, noun in REPORTS:
                if isinstance(metrics.get(key), dict) and metrics[key]:
                    lines += [f"## {label}: {split} {key.replace('_', ' ')}", ""]
                    rows = [
                        [name, *(row.get(c, "") for c in LABEL_COLUMNS)]
                        for name, row in sorted(metrics[key].items())
                    ]
                    lines += _table([noun, *LABEL_COLUMNS], rows)
            samples = metrics.get("samples") or {}
            pairs = list(zip(samples.get("prompt", []), samples.get("generated", []), strict=False))
            if pairs:
                lines += [f"## {label}: {split} samples", ""]
                for prompt, generated in pairs:
                    lines += ["```text", prompt.strip()[-500:], "---", str(generated).strip(), "```", ""]
    if images:
        lines += ["## Curves", ""]
        lines += [f"![{Path(name).stem}]({name})" for name in images]
        lines.append("")
    return "\n".join(lines)
