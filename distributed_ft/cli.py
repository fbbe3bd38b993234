"""``dft``: the command line. Thin: it parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distributed_ft.errors import DftError, Preempted

if TYPE_CHECKING:
    from distributed_ft.config.schema import JobConfig

log = logging.getLogger("distributed_ft")

EPILOG = """examples:
  dft train                                   # the embedded default: NER on CoNLL-2003 with MiniLM, offline
  dft train ner-conll2003 train.lr=3e-5 train.epochs=2
  dft train my_job.yaml run.output_dir=runs/exp1
  dft config show ner-conll2003
  dft tune ner-conll2003 --space space.yaml --trials 8   # Ray Tune + ASHA: results.md, best.yaml
  dft predict runs/exp1 --input sentences.txt
  dft evaluate runs/exp1 data.test=data/test.conll
  dft report runs/exp1 runs/exp2 --out report   # curves overlaid + report.md
  torchrun --nproc_per_node 2 -m distributed_ft train my_job.yaml run.num_workers=2
"""


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="?", default=None, help="packaged recipe name or YAML file (default: ner-conll2003)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. train.lr=3e-5 data.max_length=128",
    )


def _job_source(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """Source and overrides; ``dft train key=value`` (no source) means the default recipe."""
    source, overrides = args.source, list(args.overrides)
    if source is not None and "=" in source and not os.path.exists(source):
        source, overrides = None, [source, *overrides]
    if getattr(args, "quiet", False):
        overrides.append("run.progress=false")
    return source, overrides


def _positive(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = _positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be at most 1 (e.g. 0.4 for 40 %)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``dft`` argument parser with all its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="dft",
        description="Fine-tune pretrained transformers: local, torchrun/accelerate, or Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, library warnings")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a model (run directory: config, metrics, export)")
    _job_arguments(train)

    tune = commands.add_parser(
        "tune",
        help="hyper-parameter search on Ray Tune (ASHA on eval.metric): results table + best.yaml",
        description="Sample --trials configs from a search space around RECIPE|CONFIG and train each as the\n"
        "job `dft train` runs, one Ray Tune trial each (a local Ray, or the cluster at RAY_ADDRESS). ASHA\n"
        "compares the trials' validation eval.metric at rungs of grace x factor^k optimizer steps and\n"
        "stops the worse ones early. RUN_DIR (run.output_dir, default runs/NAME-tune-TIME) gets:\n"
        "  trials/<trial>/  each trial's run directory\n"
        "  results.csv, results.md  trial, sampled values, best metric and its step, steps, stopped early,\n"
        "                           wall s, status\n"
        "  best.yaml  the best completed trial's config: `dft train best.yaml` retrains it (same seeds,\n"
        "             same validation metric at its best checkpoint)",
        epilog="space.yaml maps dotted config keys to a distribution:\n"
        "  train.lr: {loguniform: [1e-5, 1e-3]}\n"
        "  train.warmup_ratio: {uniform: [0, 0.2]}\n"
        "  train.batch_size: {randint: [8, 33]}    # 8..32\n"
        "  train.epochs: {choice: [2, 3]}\n"
        "example:\n"
        "  dft tune ner-conll2003 train.eval_every=100 --space space.yaml --trials 8 --cpus-per-trial 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _job_arguments(tune)
    tune.add_argument("--space", required=True, help="search space YAML (dotted key: {distribution: [...]})")
    tune.add_argument("--trials", type=int, required=True, help="number of sampled configs to train")
    tune.add_argument("--cpus-per-trial", type=_positive, default=1.0, help="CPUs each trial reserves (1)")
    tune.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves (0)")
    tune.add_argument("--max-concurrent", type=int, help="trials at a time (default: what resources allow)")
    tune.add_argument(
        "--grace-period", type=int, help="steps before ASHA may stop a trial (default: train.eval_every)"
    )
    tune.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA keeps 1/factor per rung (2)")
    tune.add_argument("--seed", type=int, help="seed of the sampled values (default: train.seed)")

    evaluate = commands.add_parser("evaluate", help="score a run or model directory on a labelled file")
    evaluate.add_argument("path", help="run directory (config.yaml + export/) or model directory")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.test=FILE")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    predict = commands.add_parser("predict", help="apply a trained model to new text")
    predict.add_argument("path", help="run directory or model directory")
    predict.add_argument("--input", required=True, help="input file")
    predict.add_argument(
        "--format",
        default="text",
        choices=["text", "jsonl", "conll"],
        help="text: one sentence per line; jsonl: {'tokens': [...]} or {'text': ...}; "
        "conll: token-per-line (output gets a predicted column)",
    )
    predict.add_argument("--output", help="output file (default: stdout)")
    predict.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.max_length=512")

    export = commands.add_parser("export", help="write a save_pretrained model from a run's checkpoint")
    export.add_argument("path", help="run directory, or its storage URI (s3://...)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint path")
    export.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the weights")

    data = commands.add_parser("data", help="data utilities")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _job_arguments(data_commands.add_parser("prepare", help="read, validate, tokenize and cache the data"))
    gazetteer = data_commands.add_parser(
        "gazetteer",
        help="write a gazetteer (surface<TAB>TYPE) of the training split's entity mentions",
        description="Collects the entity mentions of data.train only (as training sees it), each surface "
        "with its most frequent type, for data.gazetteer=FILE: validation and test stay unseen.",
    )
    _job_arguments(gazetteer)
    gazetteer.add_argument("--out", required=True, help="the gazetteer file to write")
    gazetteer.add_argument(
        "--min-count", type=int, default=1, help="leave out surfaces seen fewer times (default 1)"
    )

    config = commands.add_parser("config", help="configuration utilities")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    _job_arguments(config_commands.add_parser("show", help="print the resolved config (every key)"))
    config_commands.add_parser("recipes", help="list the packaged recipes")

    plan = commands.add_parser("plan", help="predict memory, fit, throughput, time and cost on a cluster")
    _job_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--tokens", type=_positive, help="training tokens to plan for (default: from the data)")
    plan.add_argument("--mfu", type=_fraction, help="model FLOPs utilisation to assume (0 < MFU <= 1)")
    plan.add_argument("--measured-tokens-per-s", type=_positive, help="use a measured throughput instead")
    plan.add_argument(
        "--validate",
        action="store_true",
        help="run a few real steps and print predicted vs measured memory per rank (torchrun: every rank)",
    )
    plan.add_argument("--validate-steps", type=int, default=3, help="optimizer steps for --validate (>= 2)")

    report = commands.add_parser(
        "report",
        help="plot runs' curves and tabulate their final metrics (PNG + report.md)",
        description="Plot training loss, learning rate, evaluation metrics and tokens/s against steps from "
        "each RUN's metrics.jsonl (several runs overlaid, the legend naming each run directory), and write "
        "report.md: the final metrics of results.json and the per-type / per-class reports. Also writes "
        "series.json, the data of every plotted line. Plots need matplotlib; without it only report.md "
        "is written. Runs write their own report/ at the end unless track.report=false.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directory (holds metrics.jsonl)")
    report.add_argument(
        "--out", help="output directory (default: RUN/report for one run, ./report for several)"
    )

    bench = commands.add_parser(
        "bench",
        help="run a benchmark experiment (source checkout: benchmarks/)",
        description="Run benchmarks/experiments/NAME.yaml with the checkout's runner (python -m benchmarks) "
        "and write its JSON, markdown and plots. Needs a source checkout: benchmarks/ is not installed.",
    )
    bench.add_argument("experiment", nargs="?", help="experiment name or YAML file; 'all' runs each")
    bench.add_argument("--smoke", action="store_true", help="the seconds-long variant CI runs")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument("--out", help="results directory (default benchmarks/results[/tmp for --smoke])")
    bench.add_argument("--list", action="store_true", help="list the experiments")
    return parser


def _context(config=None):
    from distributed_ft.runtime.context import create_context
    from distributed_ft.runtime.tracking import setup_logging

    run = config.run if config is not None else None
    context = create_context(
        use_gpu=run.use_gpu if run else "auto", expected_world_size=run.num_workers if run else None
    )
    return context, setup_logging


def _inference_context(config):
    """The context of ``evaluate`` / ``predict`` / ``export``: the config's ``run.use_gpu``.

    Any number of processes is accepted (the launcher decides): a run trained on 8 workers exports in one.
    """
    from distributed_ft.runtime.context import create_context
    from distributed_ft.runtime.tracking import setup_logging

    return create_context(use_gpu=config.run.use_gpu), setup_logging


def _quiet_libraries(verbose: bool) -> None:
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args: argparse.Namespace) -> int:
    """``dft train``: run a job locally, under a launcher, or on Ray."""
    from distributed_ft.config import load_config

    config, name = load_config(*_job_source(args))
    if config.run.backend == "ray":
        from distributed_ft.backends.ray_train import train_on_ray

        results, run_dir = train_on_ray(config, name)
    else:
        context, setup_logging = _context(config)  # a wrong launch is refused before the heavy imports
        setup_logging(context, args.verbose)
        from distributed_ft.runtime.context import local_world_size, set_intra_op_threads
        from distributed_ft.train.loop import train

        log.info(set_intra_op_threads(config.run.num_threads, local_world_size()))
        started = time.perf_counter()
        results = train(config, context, name)
        if not context.is_main:
            return 0
        run_dir = results.get("export", "").rsplit("/export", 1)[0]
        log.info("finished in %.0f s", time.perf_counter() - started)
    from distributed_ft.tasks import get_task
    from distributed_ft.train.loop import results_summary

    print(results_summary(results, run_dir, get_task(config).format_report))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``dft tune``: hyper-parameter search on Ray Tune (``backends/ray_tune.py``)."""
    from distributed_ft.config import load_config
    from distributed_ft.config.space import read_space

    config, name = load_config(*_job_source(args))
    space = read_space(args.space)
    from distributed_ft.backends.ray_tune import TuneOptions, tune_on_ray

    options = TuneOptions(
        trials=args.trials,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        seed=args.seed,
    )
    summary = tune_on_ray(config, name, space, options)
    print(summary.files["md"].read_text())
    print(f"best config: {summary.files['best']}  (dft train {summary.files['best']})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``dft evaluate``: score a trained model on a labelled file."""
    from distributed_ft.tasks import get_task
    from distributed_ft.train.predict import evaluate_model, locate_model

    overrides = [*args.overrides, *(["run.progress=false"] if args.quiet else [])]
    context, setup_logging = _inference_context(locate_model(args.path, overrides)[1])
    setup_logging(context, args.verbose)
    metrics = evaluate_model(args.path, overrides, context)
    if context.is_main:
        _, config = locate_model(args.path, overrides)
        print(json.dumps(metrics, indent=2) if args.json else get_task(config).format_report(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``dft predict``: apply a trained model to a file."""
    from distributed_ft.train.predict import locate_model, predict_file

    overrides = [*args.overrides, *(["run.progress=false"] if args.quiet else [])]
    context, setup_logging = _inference_context(locate_model(args.path, overrides)[1])
    setup_logging(context, args.verbose)
    count = predict_file(args.path, args.input, args.format, args.output, context, overrides)
    if args.output:
        log.info("wrote %d predictions to %s", count, args.output)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``dft export``: export a checkpoint as a ``save_pretrained`` directory."""
    from distributed_ft.train.export import export_run, local_run, run_config

    # a storage URI is downloaded once (cached): export_run reads the same local copy
    context, setup_logging = _inference_context(run_config(local_run(args.path)))
    setup_logging(context, args.verbose)
    out = export_run(args.path, args.out, args.checkpoint, context, merge_lora=args.merge_lora)
    log.info("exported %s", out)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``dft data prepare``: read, validate, tokenize and cache the data of a job; ``dft data gazetteer``."""
    from distributed_ft.config import load_config
    from distributed_ft.train.job import data_splits, load_task, prepare_data_once

    config, _ = load_config(*_job_source(args))
    context, setup_logging = _context()
    setup_logging(context, args.verbose)
    if args.data_command == "gazetteer":
        return _write_gazetteer(config, args.out, args.min_count)
    tokenizer, task = load_task(config)
    prepared = prepare_data_once(task, tokenizer, data_splits(config), None, context)
    print(prepared.directory)
    return 0


def _write_gazetteer(config: JobConfig, out: str, min_count: int) -> int:
    """``dft data gazetteer``: the training split's mentions written to ``out``, counts printed."""
    from distributed_ft.data.gazetteer import write_gazetteer
    from distributed_ft.errors import ConfigError
    from distributed_ft.tasks import get_task

    if config.task != "token_classification":
        raise ConfigError(
            "dft data gazetteer collects entity mentions: it needs task=token_classification, "
            f"not {config.task}"
        )
    built = get_task(config).training_gazetteer(min_count)
    write_gazetteer(built, out, str(config.data.train))
    print(f"{out}: {built.describe()}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``dft config show|recipes``."""
    from distributed_ft.config import dump_config, load_config, recipe_names

    if args.config_command == "recipes":
        print("\n".join(recipe_names()))
        return 0
    config, _ = load_config(*_job_source(args))
    print(dump_config(config), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``dft plan``: the capacity plan of a job on ``cluster.*``."""
    from distributed_ft.config import load_config
    from distributed_ft.planning import plan_job

    config, _ = load_config(*_job_source(args))
    if args.validate:
        return _validate_plan(config, args)
    report = plan_job(
        config,
        num_train_tokens=int(args.tokens) if args.tokens else None,
        measured_tokens_per_s=args.measured_tokens_per_s,
        mfu=args.mfu,
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format_table())
    return 0


def _validate_plan(config, args: argparse.Namespace) -> int:
    """``dft plan --validate``: the planner vs a short real job (``train/measure.py``)."""
    from distributed_ft.train.measure import validate_plan

    context, setup_logging = _context(config)
    setup_logging(context, args.verbose)
    report = validate_plan(config, context, steps=args.validate_steps)
    if context.is_main:
        print(json.dumps(report.to_json(), indent=2, default=str) if args.json else report.format_table())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``dft report``: curves and tables of one or more runs (torch-free)."""
    from distributed_ft.train.report import write_report

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.propagate = False
    runs = [Path(run) for run in args.runs]
    out = Path(args.out) if args.out else runs[0] / "report" if len(runs) == 1 else Path("report")
    report = write_report(runs, out)
    print(report.directory / "report.md")
    return 0


def _checkout_root() -> Path | None:
    """The source checkout this package runs from (it has ``benchmarks/runner.py``), else ``None``."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "benchmarks" / "runner.py").is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """``dft bench``: ``python -m benchmarks`` in the source checkout, its output streamed, its exit code."""
    import subprocess

    root = _checkout_root()
    if root is None:
        print(
            "dft bench: error: benchmarks/ is not installed with the package; run it from a source "
            "checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    argv = [args.experiment] if args.experiment else []
    argv += [flag for flag in ("--smoke", "--json", "--list") if getattr(args, flag[2:])]
    argv += ["--out", os.path.abspath(args.out)] if args.out else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "benchmarks", *argv]
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    return child.returncode


COMMANDS = {
    "train": cmd_train,
    "tune": cmd_tune,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "export": cmd_export,
    "data": cmd_data,
    "config": cmd_config,
    "plan": cmd_plan,
    "report": cmd_report,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dft`` and ``python -m distributed_ft``; user errors exit 2 with one message."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        args, extra = parser.parse_known_args(["train", *(argv or sys.argv[1:])])
    # key=value overrides may also follow options (dft predict RUN --input F data.max_length=512)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command != "report":  # dft report imports neither transformers nor torch
        _quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except Preempted as exc:
        given = list(sys.argv[1:] if argv is None else argv)
        print(f"dft {args.command}: {exc}", file=sys.stderr)
        print(f"dft {args.command}: resume with: {shlex.join(['dft', *given])}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what schedulers expect from a pre-empted job
    except DftError as exc:
        print(f"dft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"dft {args.command}: interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
