"""The README's first ``dft train`` command of each task runs as written, on tiny local models and data.

The commands are parsed out of README.md's ``bash`` blocks, so a README edit that breaks one (a renamed
recipe, a key that no longer exists) fails here. Only what has to change to run offline and small is
added as overrides after the command: the model (a tiny ``save_pretrained`` directory), the data files
(tiny files with the columns the recipe reads), a few steps, and the run and cache directories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_ft.testing import ENTITY_WORDS, FILLER, INSTRUCTIONS, make_conll

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))},
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}
TASKS = ("token_classification", "sequence_classification", "causal_lm")
METRICS = {
    "token_classification": {"f1", "precision", "recall", "per_type"},
    "sequence_classification": {"accuracy", "macro_f1", "micro_f1", "per_class"},
    "causal_lm": {"loss", "perplexity"},
}


def readme_train_commands() -> list[list[str]]:
    """Every ``dft train ...`` line of README.md's bash blocks (comments and continuations handled)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["dft", "train"]:
                commands.append(words)
    return commands


def quickstart_commands() -> dict[str, list[str]]:
    """The first local ``dft train RECIPE ...`` of each task in README.md (launchers and Ray left out)."""
    from distributed_ft.config import load_config, recipe_names

    found: dict[str, list[str]] = {}
    for words in readme_train_commands():
        recipe = words[2] if len(words) > 2 else "ner-conll2003"
        if recipe not in recipe_names() or any(w.startswith("run.backend=") for w in words):
            continue
        task = load_config(recipe, words[3:])[0].task
        found.setdefault(task, words)
    return found


def _classification_jsonl(path: Path, rows: int, seed: int) -> Path:
    """``text`` + ``main_type`` records (the columns of the text-classification recipe)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        label = rng.choice(sorted(ENTITY_WORDS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, len(words)), rng.choice(ENTITY_WORDS[label]))
        lines.append(json.dumps({"text": " ".join(words), "main_type": label, "types": [label]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("quickstart-data")
    return {
        "token_classification": {
            split: make_conll(root / f"{split}.conll", n, seed=i)
            for i, (split, n) in enumerate([("train", 48), ("validation", 16), ("test", 16)])
        },
        "sequence_classification": {
            split: _classification_jsonl(root / f"{split}.jsonl", n, seed=i)
            for i, (split, n) in enumerate([("train", 48), ("validation", 16), ("test", 16)])
        },
        "causal_lm": {split: INSTRUCTIONS / f"{split}.jsonl" for split in ("train", "validation", "test")},
    }


def test_the_readme_has_a_quickstart_command_for_every_task():
    found = quickstart_commands()
    assert set(found) == set(TASKS), f"README.md has `dft train` commands for {sorted(found)} only"


@pytest.mark.parametrize("task", TASKS)
def test_the_readme_quickstart_command_runs(task, tiny_bert, tiny_llama, tiny_data, tmp_path):
    found = quickstart_commands()
    if task not in found:
        pytest.fail(f"README.md has no local `dft train` command for {task}")
    readme_command = found[task]
    model = tiny_llama if task == "causal_lm" else tiny_bert
    substituted = [
        f"model.name={model}",
        *(f"data.{split}={path}" for split, path in tiny_data[task].items()),
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run.output_dir={tmp_path / 'run'}",
        "run.num_threads=1",
        "train.max_steps=3",
        "train.batch_size=8",
        "eval.batch_size=16",
    ]
    command = [sys.executable, "-m", "distributed_ft", "-q", *readme_command[1:], *substituted]
    done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    shown = f"$ {shlex.join(readme_command)}  (+ {' '.join(substituted)})\n"
    shown += done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, shown
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for split in ("dev", "test"):
        assert METRICS[task] <= set(results[split]), f"{split}: {sorted(results[split])}\n{shown}"
    assert (tmp_path / "run" / "export").is_dir()
