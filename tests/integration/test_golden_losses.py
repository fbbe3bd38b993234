"""Golden losses: the first training losses of every task x engine, pinned (as torchtune's recipe tests do).

Each variant trains the tiny local models of ``distributed_ft.testing`` in this process, on the CPU, with
one intra-op thread (``one_torch_thread``), fixed seed, ``train.max_steps=STEPS``, ``train.grad_accum=2``
and a 2-step warmup, and compares the per-step ``loss`` of ``metrics.jsonl`` with ``GOLDEN``. A change
anywhere on the path of a batch (data order, tokenization, collation, the loss, its normalisation over an
accumulation window, clipping, the optimizer, the schedule, the seed) shows here, even when it shifts
every variant alike and every other test still sees the loss fall.

The engines are ``torch`` (plain, one process) and ``deepspeed`` ZeRO-2 in one process (a one-member gloo
group, ``runtime.context.ensure_process_group``); the 2-process ZeRO stages are compared with DDP in
``test_deepspeed.py``.

Tolerance (``RTOL``, ``ATOL``): repeated runs are bitwise identical. Summation order moves the losses by
at most ~5e-8 relative over the steps (2 intra-op threads instead of 1; DeepSpeed's flattened gradients
instead of torch's), and ``RTOL=1e-5`` leaves 200x that for other CPUs and library builds. Deliberate
changes are far above it: ``train.lr`` 0.1 % higher moves the losses by ~1e-4 relative, and doubling
``train.weight_decay`` by ~1e-5 by the last step.

Regenerate after a deliberate change::

    DFT_PRINT_GOLDEN=1 .venv/bin/python -m pytest tests/integration/test_golden_losses.py

prints every variant's ``GOLDEN`` entry, ready to paste (each failure message also holds its measured
list). The exact floats depend on the torch / transformers / DeepSpeed versions and the CPU kernels: the
table was made with torch 2.13.0+cpu, transformers 5.24.0, deepspeed 0.19.8 (x86-64, 1 thread). Update
the table and this line together.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from distributed_ft.config.load import load_config
from distributed_ft.runtime.context import LocalContext
from distributed_ft.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 8
RTOL, ATOL = 1e-5, 1e-6
ENGINES_RTOL = 1e-6
"""torch and DeepSpeed ZeRO-2 in one process run the same fp32 math (observed: <= 5e-8 relative)."""

# (task, engine): the logged `loss` of training steps 1..STEPS (step 1: the untrained model, and the
# schedule's lr is 0 there, so step 2 does not depend on the optimizer either).
# fmt: off
GOLDEN: dict[tuple[str, str], list[float]] = {
    ("token_classification", "torch"):  # the recipe's CRF head: its negative log-likelihood per word
        [1.45072538, 1.50144987, 1.36977417, 1.08017091, 1.06041460, 0.91311061, 0.86394579, 1.03240356],
    ("token_classification", "deepspeed"):
        [1.45072538, 1.50144987, 1.36977417, 1.08017091, 1.06041460, 0.91311065, 0.86394581, 1.03240356],
    ("sequence_classification", "torch"):
        [1.10065476, 1.09950927, 1.07906708, 1.11068253, 1.32348501, 1.34291545, 1.05055101, 1.02717034],
    ("sequence_classification", "deepspeed"):
        [1.10065476, 1.09950927, 1.07906708, 1.11068253, 1.32348501, 1.34291545, 1.05055101, 1.02717034],
    ("causal_lm", "torch"):
        [6.41649367, 6.43129548, 6.29870155, 6.09469706, 6.00095661, 5.82644566, 5.79029839, 5.68948792],
    ("causal_lm", "deepspeed"):
        [6.41649367, 6.43129548, 6.29870155, 6.09469706, 6.00095661, 5.82644566, 5.79029839, 5.68948764],
}
# fmt: on

TASKS = ["token_classification", "sequence_classification", "causal_lm"]
ENGINES = {
    "torch": ["run.engine=torch"],
    "deepspeed": ["run.engine=deepspeed", "deepspeed.zero_stage=2"],
}
COMMON = [
    "run.use_gpu=false",
    "run.progress=false",
    "data.validation=null",
    "data.test=null",
    "data.max_train_samples=null",
    f"train.max_steps={STEPS}",
    "train.grad_accum=2",
    "train.warmup_ratio=0.25",  # 2 warmup steps: the updates use lr 0, 1.5e-3, 3e-3, then 2.5e-3 ... 5e-4
    "train.lr=3e-3",
    "train.seed=42",
    "train.log_every=1",
]


def _classification_jsonl(path: Path, n: int, seed: int) -> Path:
    """Sentences labelled by the entity type they hold (ORG rare, so class weights matter)."""
    rng = random.Random(seed)
    kinds = {"LOC": ["paris", "london", "berlin"], "ORG": ["eu", "nato"], "PER": ["john", "mary", "anna"]}
    filler = ["the", "said", "in", "on", "a", "with", "from", "to", "and", "of"]
    with path.open("w") as handle:
        for _ in range(n):
            kind = rng.choices(sorted(kinds), weights=[3, 1, 3])[0]
            words = [rng.choice(filler) for _ in range(rng.randint(2, 6))]
            words.insert(rng.randint(0, len(words)), rng.choice(kinds[kind]))
            handle.write(json.dumps({"text": " ".join(words), "label": kind}) + "\n")
    return path


def _job(task: str, root: Path, tiny_bert: Path, tiny_llama: Path, tiny_conll: dict) -> tuple[str, list]:
    """The recipe and overrides of ``task``'s job, writing under ``root``."""
    if task == "token_classification":  # 240 sentences: 15 batches, the 8th step a partial window
        recipe, model = "ner-conll2003", tiny_bert
        extra = [f"data.train={tiny_conll['train']}", "data.max_length=64", "train.batch_size=16"]
    elif task == "sequence_classification":  # 200 rows: 13 batches, the 8th step in the 2nd epoch
        recipe, model = "text-classification", tiny_bert
        train_file = _classification_jsonl(root / "train.jsonl", 200, seed=1)
        extra = [f"data.train={train_file}", "data.label_column=label", "data.class_weights=balanced"]
        extra += ["data.max_length=32", "train.batch_size=16"]
    else:  # the packaged instruction set, packed into rows of 128 tokens
        recipe, model = "instruction-tuning", tiny_llama
        extra = ["data.max_length=128", "data.generate_samples=0", "train.batch_size=8"]
    paths = [f"data.cache_dir={root / 'cache'}", f"run.output_dir={root / 'run'}"]
    return recipe, [*paths, *COMMON, f"model.name={model}", *extra]


def _train_losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {e["step"]: e["loss"] for e in events if e["event"] == "train"}
    return [steps[step] for step in sorted(steps)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_bert, tiny_llama, tiny_conll):
    """``measured(task, engine)``: the per-step training losses of that variant (trained once)."""
    import torch.distributed as dist

    environ, had_group = dict(os.environ), dist.is_initialized()
    runs: dict[tuple[str, str], list[float]] = {}

    def get(task: str, engine: str) -> list[float]:
        if (task, engine) not in runs:
            if engine == "deepspeed":
                pytest.importorskip("deepspeed")
            root = tmp_path_factory.mktemp(f"golden-{task}-{engine}")
            recipe, overrides = _job(task, root, tiny_bert, tiny_llama, tiny_conll)
            config, name = load_config(recipe, [*overrides, *ENGINES[engine]])
            assert (config.task, config.run.engine) == (task, engine)
            train(config, LocalContext(use_gpu=False), name)
            runs[task, engine] = _train_losses(root / "run")
        return runs[task, engine]

    yield get
    # DeepSpeed leaves a one-member process group and LOCAL_RANK behind: later tests see neither
    if dist.is_initialized() and not had_group:
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def _entry(task: str, engine: str, losses: list[float]) -> str:
    values = ", ".join(f"{x:.8f}" for x in losses)
    return f'    ("{task}", "{engine}"):\n        [{values}],'


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("task", TASKS)
def test_first_losses_match_the_golden_table(measured, task, engine, capsys):
    losses = measured(task, engine)
    if os.environ.get("DFT_PRINT_GOLDEN"):
        with capsys.disabled():
            print(f"\n{_entry(task, engine, losses)}")
    advice = (
        f"if the change is deliberate, update GOLDEN (and the versions in the module docstring) with:\n"
        f"{_entry(task, engine, losses)}"
    )
    expected = GOLDEN.get((task, engine))
    assert expected is not None and len(losses) == len(expected) == STEPS, f"{losses}; {advice}"
    assert losses == pytest.approx(expected, rel=RTOL, abs=ATOL), (
        f"the first {STEPS} losses of {task} / {engine} moved; {advice}"
    )


@pytest.mark.parametrize("task", TASKS)
def test_torch_and_zero2_follow_the_same_losses(measured, task):
    """Holds whatever the table says: both engines step the same fp32 AdamW on the same batches."""
    torch_losses, zero2 = measured(task, "torch"), measured(task, "deepspeed")
    assert zero2 == pytest.approx(torch_losses, rel=ENGINES_RTOL), (torch_losses, zero2)
