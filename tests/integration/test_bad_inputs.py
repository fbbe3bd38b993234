"""Bad input of every kind through the real ``dft`` command line, one table.

Each case writes its bad input under ``tmp_path``, runs ``python -m distributed_ft ...`` in a subprocess
(offline, one thread) and checks what a user sees: exit code 2, the file and line (or the config key) that
is wrong, a hint of what to do, no traceback, and nothing of theirs changed: the input files hash the same
afterwards and a finished run's ``results.json`` is untouched. Almost every case fails before a step is
trained; the cases that need a finished run share one, trained once per module (tiny BERT, 2 steps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from distributed_ft.testing import make_conll

ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))},
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}
TIMEOUT_S = 180
pytestmark = pytest.mark.slow


def dft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distributed_ft", "-q", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@dataclasses.dataclass(frozen=True)
class World:
    """What a case builds on: the tiny models, a finished run, and the case's own directory."""

    tmp: Path
    bert: Path
    llama: Path
    conll: Path
    """A valid tiny CoNLL training file (shared, read-only)."""
    finished: Path
    """A finished NER run directory (``results.json``), shared by the cases."""
    sc_head: Path
    """The tiny BERT with a 3-label sequence-classification head."""

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def sizing(self) -> list[str]:
        return [
            f"data.cache_dir={self.tmp / 'cache'}",
            f"run.output_dir={self.tmp / 'run'}",
            "run.num_threads=1",
            "data.max_length=32",
            "train.max_steps=2",
            "train.batch_size=8",
        ]

    def ner(self, train: Path | str | None = None, *extra: str) -> list[str]:
        """``dft train ner-conll2003`` on the tiny BERT with ``train`` (default: the valid corpus)."""
        return [
            "train",
            "ner-conll2003",
            f"model.name={self.bert}",
            f"data.train={train or self.conll}",
            *self.sizing(),
            *extra,
        ]

    def seqcls(self, train: Path | str, *extra: str) -> list[str]:
        return [
            "train",
            "task=sequence_classification",
            f"model.name={self.bert}",
            f"data.train={train}",
            *self.sizing(),
            *extra,
        ]

    def lm(self, train: Path | str, *extra: str) -> list[str]:
        return [
            "train",
            "task=causal_lm",
            f"model.name={self.llama}",
            f"data.train={train}",
            *self.sizing(),
            *extra,
        ]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[World], list[str]]
    """Writes the case's files under ``World.tmp`` and returns the ``dft`` arguments."""
    where: str
    """The file:line or config key the message names; ``{tmp}`` / ``{finished}`` / ``{bert}`` expand."""
    hint: str
    """What the message tells the user to do (a pinned substring)."""
    known_gap: str | None = None
    """Why the case fails today (a rule that has not landed yet): the case is marked xfail(strict)."""


GOOD_JSONL = '{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n'
SC_JSONL = '{"text": "paris is nice", "label": "LOC"}\n{"text": "john smith", "label": "PER"}\n'
LM_JSONL = '{"prompt": "Capital of Peru?", "response": "Lima."}\n'


def _parquet(world: World, name: str, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = world.tmp / name
    pq.write_table(pa.table(columns), path)
    return path


def _class_folders(world: World, classes: dict[str, list[str]]) -> Path:
    root = world.tmp / "folders"
    for label, texts in classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (root / label / f"{i}.txt").write_text(text)
    return root


def _ds_json(world: World, text: str) -> Path:
    return world.write("ds.json", text)


CASES = [
    # ------------------------------------------------------------------ CoNLL
    Case(
        "conll-too-few-columns",
        lambda w: w.ner(w.write("train.conll", "EU B-ORG\nrejects O\n\nEU\n")),
        "{tmp}/train.conll:4",
        "expected at least 2 whitespace-separated columns",
    ),
    Case(
        "conll-ragged-columns",
        lambda w: w.ner(
            w.write("train.conll", "EU NNP B-ORG\nrejects VBZ O\nsaid O\n"), "data.conll_tag_column=2"
        ),
        "{tmp}/train.conll:3",
        "every token line needs the same columns",
    ),
    Case(
        "conll-bad-tag",
        lambda w: w.ner(w.write("train.conll", "EU B_ORG\nrejects O\n")),
        "{tmp}/train.conll:1",
        "tag 'B_ORG' is not a valid tag; expected 'O' or PREFIX-TYPE",
    ),
    Case(
        "conll-invalid-utf8",
        lambda w: w.ner(w.write("train.conll", b"EU B-ORG\nrejects O\n\nM\xfcnchen B-LOC\n")),
        "{tmp}/train.conll:4",
        "re-encode the file as UTF-8",
    ),
    Case(
        "conll-empty-file",
        lambda w: w.ner(w.write("train.conll", "")),
        "{tmp}/train.conll",
        "no sentences found",
    ),
    Case(
        "conll-only-docstart",
        lambda w: w.ner(w.write("train.conll", "-DOCSTART- -X- -X- O\n\n")),
        "{tmp}/train.conll",
        "holds only blank/-DOCSTART- lines",
    ),
    Case(
        "conll-tag-scheme-does-not-fit",
        lambda w: w.ner(w.write("train.conll", "John B-PER\nSmith E-PER\nsaid O\n"), "data.tag_scheme=iob2"),
        "{tmp}/train.conll:2",
        "set data.tag_scheme=auto or iobes",
    ),
    Case(
        "conll-tag-column-out-of-range",
        lambda w: w.ner(w.write("train.conll", "EU NNP B-ORG\n"), "data.conll_tag_column=5"),
        "data.conll_tag_column=5",
        "use 1..2 or -1..-2",
    ),
    Case(
        "conll-validation-tag-unseen-in-training",
        lambda w: w.ner(
            None, "data.validation=" + str(w.write("dev.conll", "Rome B-LOC\nis O\nBob B-MISC\n"))
        ),
        "{tmp}/dev.conll:3",
        "add examples of it to the training data or fix the tag",
    ),
    Case(
        "conll-train-file-missing",
        lambda w: w.ner(w.tmp / "nope.conll"),
        "{tmp}/nope.conll",
        "file not found",
    ),
    Case(
        "conll-glob-matches-nothing",
        lambda w: w.ner(f"{w.tmp}/shards/*.conll"),
        "{tmp}/shards/*.conll",
        "no files match this pattern",
    ),
    Case(
        "data-unknown-extension",
        lambda w: w.ner(w.write("train.dat", "EU B-ORG\n")),
        "{tmp}/train.dat",
        "set data.format=",
    ),
    # ------------------------------------------------------------------ JSONL
    Case(
        "jsonl-invalid-json",
        lambda w: w.ner(w.write("train.jsonl", GOOD_JSONL + '{"tokens": ["a"], "tags": ["O"]\n')),
        "{tmp}/train.jsonl:2",
        "invalid JSON",
    ),
    Case(
        "jsonl-missing-column",
        lambda w: w.ner(w.write("train.jsonl", GOOD_JSONL + '{"tokens": ["a"], "labels": ["O"]}\n')),
        "{tmp}/train.jsonl:2",
        "set data.tokens_column / data.tags_column to the right names",
    ),
    Case(
        "jsonl-wrong-type",
        lambda w: w.ner(w.write("train.jsonl", '{"tokens": "EU rejects", "tags": 7}\n')),
        "{tmp}/train.jsonl:1",
        "'tags' must be a list of strings",
    ),
    Case(
        "jsonl-not-an-object",
        lambda w: w.ner(w.write("train.jsonl", GOOD_JSONL + '["EU", "B-ORG"]\n')),
        "{tmp}/train.jsonl:2",
        "expected a JSON object, found list",
    ),
    Case(
        "jsonl-token-tag-count-mismatch",
        lambda w: w.ner(w.write("train.jsonl", '{"tokens": ["EU", "rejects"], "tags": ["B-ORG"]}\n')),
        "{tmp}/train.jsonl:1",
        "every word needs exactly one tag",
    ),
    # ------------------------------------------------------------------ CSV
    Case(
        "csv-missing-column",
        lambda w: w.ner(w.write("train.csv", "words,tags\nEU rejects,B-ORG O\n")),
        "{tmp}/train.csv:1",
        "set data.tokens_column / data.tags_column to the right names",
    ),
    Case(
        "csv-ragged-row",
        lambda w: w.ner(w.write("train.csv", "tokens,tags\nEU rejects,B-ORG O\nEU,B-ORG,extra\n")),
        "{tmp}/train.csv:3",
        "quote fields that contain commas",
    ),
    Case(
        "csv-sequence-classification-empty-text",
        lambda w: w.seqcls(w.write("train.csv", "text,label\nparis is nice,LOC\n,PER\n")),
        "{tmp}/train.csv:3",
        "remove the record or give it a text",
    ),
    # ------------------------------------------------------------------ Parquet
    Case(
        "parquet-missing-column",
        lambda w: w.ner(_parquet(w, "train.parquet", {"tokens": [["EU"]], "ner": [["B-ORG"]]})),
        "{tmp}/train.parquet",
        "set data.tokens_column / data.tags_column to the right names",
    ),
    Case(
        "parquet-not-parquet",
        lambda w: w.ner(w.write("train.parquet", GOOD_JSONL)),
        "{tmp}/train.parquet",
        "check the file or data.format",
    ),
    # ------------------------------------------------------------------ folder per class
    Case(
        "folder-empty-class-folder",
        lambda w: w.seqcls(_class_folders(w, {"pos": ["good film"], "neg": []})),
        "{tmp}/folders/neg",
        "empty class folder (class 'neg' would have no examples); add its text files or remove the folder",
    ),
    Case(
        "folder-empty-text-file",
        lambda w: w.seqcls(_class_folders(w, {"pos": ["good film"], "neg": [""]})),
        "{tmp}/folders/neg/0.txt:1",
        "must hold one example's text",
    ),
    Case(
        "folder-without-class-folders",
        lambda w: w.seqcls(w.write("folders/loose.txt", "text").parent),
        "{tmp}/folders",
        "one sub-folder per class",
    ),
    # ------------------------------------------------------------------ sequence classification / LM data
    Case(
        "jsonl-sequence-classification-unseen-label",
        lambda w: w.seqcls(
            w.write("train.jsonl", SC_JSONL),
            "data.validation=" + str(w.write("dev.jsonl", '{"text": "nato", "label": "ORG"}\n')),
        ),
        "{tmp}/dev.jsonl:1",
        "add examples of it to the training data or fix the label",
    ),
    Case(
        "jsonl-sequence-classification-missing-label-column",
        lambda w: w.seqcls(w.write("train.jsonl", SC_JSONL), "data.label_column=stars"),
        "{tmp}/train.jsonl:1",
        "set data.text_column / data.label_column",
    ),
    Case(
        "jsonl-causal-lm-missing-response",
        lambda w: w.lm(w.write("train.jsonl", LM_JSONL + '{"prompt": "2+2?", "answer": "4"}\n')),
        "{tmp}/train.jsonl:2",
        "set data.messages_column / data.prompt_column / data.response_column",
    ),
    Case(
        "jsonl-causal-lm-chat-not-ending-with-assistant",
        lambda w: w.lm(
            w.write(
                "train.jsonl",
                '{"messages": [{"role": "user", "content": "hi"}]}\n',
            )
        ),
        "{tmp}/train.jsonl:1",
        "must be the assistant's",
    ),
    # ------------------------------------------------------------------ YAML configs
    Case(
        "yaml-invalid",
        lambda w: ["train", str(w.write("job.yaml", "task: token_classification\ntrain:\n  lr: [1e-4\n"))],
        "{tmp}/job.yaml:4:1: not valid YAML",
        "check the indentation, the ':' after each key and the quotes",
    ),
    Case(
        "yaml-not-a-mapping",
        lambda w: ["train", str(w.write("job.yaml", "- task\n- token_classification\n"))],
        "{tmp}/job.yaml",
        "the top level must be a mapping of sections",
    ),
    Case(
        "yaml-unknown-key-with-suggestion",
        lambda w: ["config", "show", str(w.write("job.yaml", "train:\n  epoch: 3\n"))],
        "train.epoch",
        "did you mean 'train.epochs'",
    ),
    Case(
        "yaml-unknown-key-named-as-in-transformers",
        lambda w: ["config", "show", str(w.write("job.yaml", "train:\n  learning_rate: 1.0e-4\n"))],
        "train.learning_rate",
        "did you mean 'train.lr'",
    ),
    Case(
        "yaml-wrong-type",
        lambda w: ["train", str(w.write("job.yaml", "train:\n  batch_size: sixteen\n"))],
        "config key 'train.batch_size'",
        "should be a valid integer",
    ),
    Case(
        "yaml-unknown-task",
        lambda w: ["config", "show", str(w.write("job.yaml", "task: ner\n"))],
        "config key 'task'",
        "should be 'token_classification'",
    ),
    Case(
        "yaml-file-missing",
        lambda w: ["train", str(w.tmp / "nope.yaml")],
        "{tmp}/nope.yaml",
        "does not exist",
    ),
    # ------------------------------------------------------------------ overrides
    Case(
        "override-without-equals",
        lambda w: ["config", "show", "ner-conll2003", "train.lr"],
        "'train.lr'",
        "is not of the form key=value",
    ),
    Case(
        "override-wrong-type",
        lambda w: ["config", "show", "ner-conll2003", "train.batch_size=big"],
        "config key 'train.batch_size'",
        "should be a valid integer",
    ),
    Case(
        "override-unknown-key-with-suggestion",
        lambda w: ["train", "ner-conll2003", "data.max_lenght=64"],
        "data.max_lenght",
        "did you mean 'data.max_length'",
    ),
    Case(
        "override-out-of-range",
        lambda w: ["train", "ner-conll2003", "train.warmup_ratio=1.5"],
        "config key 'train.warmup_ratio'",
        "less than or equal to 1",
    ),
    Case(
        "override-metric-of-another-task",
        lambda w: ["train", "ner-conll2003", "eval.metric=perplexity"],
        "eval.metric='perplexity'",
        "use one of f1, precision",
    ),
    Case(
        "override-packing-on-token-classification",
        lambda w: ["train", "ner-conll2003", "data.packing=true"],
        "data.packing",
        "drop it, or set task=causal_lm",
    ),
    # ------------------------------------------------------------------ model directories
    Case(
        "model-dir-missing",
        lambda w: w.ner(None, f"model.name={w.tmp / 'no-model'}"),
        "{tmp}/no-model",
        "does not exist",
    ),
    Case(
        "model-dir-without-weights",
        lambda w: w.ner(None, f"model.name={_config_only(w)}"),
        "{tmp}/config-only",
        "Pass a directory written by save_pretrained",
    ),
    Case(
        "model-wrong-head-with-reset-head-false",
        lambda w: w.ner(None, f"model.name={w.sc_head}", "model.reset_head=false"),
        "{sc_head}",
        "set model.reset_head=auto to replace it",
    ),
    # ------------------------------------------------------------------ DeepSpeed JSON
    Case(
        "deepspeed-config-missing",
        lambda w: w.ner(None, "run.engine=deepspeed", f"deepspeed.config={w.tmp / 'ds.json'}"),
        "{tmp}/ds.json",
        "give a DeepSpeed JSON file",
    ),
    Case(
        "deepspeed-config-malformed",
        lambda w: w.ner(
            None, "run.engine=deepspeed", "deepspeed.config=" + str(_ds_json(w, '{"zero_optimization": {'))
        ),
        "{tmp}/ds.json",
        "is not valid JSON",
    ),
    Case(
        "deepspeed-config-contradicts-job",
        lambda w: w.ner(
            None,
            "run.engine=deepspeed",
            "deepspeed.zero_stage=2",
            f"deepspeed.config={_ds_json(w, json.dumps({'zero_optimization': {'stage': 3}}))}",
        ),
        "{tmp}/ds.json",
        "make them agree (change deepspeed.zero_stage",
    ),
    Case(
        "deepspeed-key-beside-torch-engine-in-yaml",
        lambda w: ["train", str(w.write("job.yaml", "run:\n  engine: torch\ndeepspeed:\n  zero_stage: 3\n"))],
        "deepspeed.zero_stage=3",
        "set run.engine=deepspeed",
    ),
    # ------------------------------------------------------------------ PEFT
    Case(
        "peft-targets-match-no-module",
        lambda w: w.ner(None, "peft.method=lora", "peft.target_modules=[q_proj,v_proj]"),
        "peft.target_modules",
        "modules that can be adapted: classifier, dense, key",
    ),
    Case(
        "peft-option-of-another-method",
        lambda w: ["config", "show", "ner-conll2003", "peft.use_dora=true"],
        "peft.use_dora",
        "peft.method=lora",
    ),
    # ------------------------------------------------------------------ resume
    Case(
        "resume-from-missing-checkpoint",
        lambda w: w.ner(None, f"run.resume={w.tmp / 'checkpoints' / 'step-0000099'}"),
        "{tmp}/checkpoints/step-0000099",
        "does not exist; give a step-NNNNNNN directory of a run's checkpoints/, run.resume=auto",
    ),
    # ------------------------------------------------------------------ a finished run
    Case(
        "rerun-finished-run-with-another-config",
        lambda w: w.ner(None, f"run.output_dir={w.finished}", "train.lr=1e-3", "data.max_length=48"),
        "run.output_dir={finished}",
        "Give a new run.output_dir",
    ),
    Case(
        "rerun-finished-run-with-resume-never",
        lambda w: w.ner(None, f"run.output_dir={w.finished}", "run.resume=never", "train.max_steps=3"),
        "run.output_dir={finished}",
        "Give a new run.output_dir",
    ),
    # ------------------------------------------------------------------ predict / evaluate
    Case(
        "predict-input-missing",
        lambda w: ["predict", str(w.finished), "--input", str(w.tmp / "nope.txt")],
        "{tmp}/nope.txt",
        "no such file; give the path of a file to predict",
    ),
    Case(
        "predict-input-of-the-wrong-format",
        lambda w: [
            "predict",
            str(w.finished),
            "--input",
            str(w.write("in.txt", "EU rejects\n")),
            "--format",
            "jsonl",
        ],
        "{tmp}/in.txt:1",
        "expected one object per line",
    ),
    Case(
        "predict-run-dir-missing",
        lambda w: ["predict", str(w.tmp / "no-run"), "--input", str(w.write("in.txt", "EU rejects\n"))],
        "{tmp}/no-run",
        "neither a run directory (config.yaml + export/) nor a model directory",
    ),
    Case(
        "evaluate-test-file-with-bad-tag",
        lambda w: ["evaluate", str(w.finished), "data.test=" + str(w.write("test.conll", "EU ORG\n"))],
        "{tmp}/test.conll:1",
        "expected 'O' or PREFIX-TYPE",
    ),
    # ------------------------------------------------------------------ plan
    Case(
        "plan-zero-gpus-per-node",
        lambda w: ["plan", f"model.name={w.bert}", "cluster.gpus_per_node=0"],
        "config key 'cluster.gpus_per_node'",
        "greater than or equal to 1",
    ),
    Case(
        "plan-negative-tokens",
        lambda w: ["plan", f"model.name={w.bert}", "--tokens", "-5"],
        "--tokens",
        "positive",
    ),
    Case(
        "plan-model-dir-missing",
        lambda w: ["plan", f"model.name={w.tmp / 'no-model'}"],
        "{tmp}/no-model",
        "does not exist",
    ),
]


def _config_only(world: World) -> Path:
    """A model directory with config.json and the tokenizer but no weights."""
    import shutil

    folder = world.tmp / "config-only"
    folder.mkdir()
    for item in world.bert.iterdir():
        if not item.name.startswith("model"):
            shutil.copy(item, folder / item.name)
    return folder


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def shared(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """A valid corpus, a finished NER run (2 steps) and a model with a sequence-classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("bad-inputs")
    conll = make_conll(root / "train.conll", 40, seed=1)
    sc_head = root / "sc3"
    labels = ["neg", "neu", "pos"]
    AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert),
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    ).save_pretrained(sc_head)
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(sc_head)
    finished = root / "finished"
    job = [
        "train",
        "ner-conll2003",
        f"model.name={tiny_bert}",
        f"data.train={conll}",
        f"data.cache_dir={root / 'cache'}",
        f"run.output_dir={finished}",
        "run.num_threads=1",
        "data.max_length=32",
        "train.max_steps=2",
        "train.batch_size=8",
    ]
    done = dft(*job, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (finished / "results.json").is_file()
    return {"conll": conll, "finished": finished, "sc_head": sc_head}


@dataclasses.dataclass
class Outcome:
    args: list[str]
    done: subprocess.CompletedProcess
    before: dict[str, str]
    after: dict[str, str]
    expand: dict[str, Path]

    def shown(self) -> str:
        out = self.done.stdout + self.done.stderr
        return f"$ dft {' '.join(self.args)}\n-> exit {self.done.returncode}\n{out[-4000:]}"


def _run_case(case: Case, world: World, kept: list[Path]) -> Outcome:
    args = case.build(world)
    before = _hashes(world.tmp, *kept)
    done = dft(*args, cwd=world.tmp)
    expand = {"tmp": world.tmp, "finished": world.finished, "sc_head": world.sc_head, "bert": world.bert}
    return Outcome(args, done, before, _hashes(world.tmp, *kept), expand)


@pytest.fixture(scope="module")
def outcomes(request, shared, tiny_bert, tiny_llama, tmp_path_factory) -> dict[str, Future]:
    """Every selected case, run two at a time (each case is a process that mostly imports torch)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    kept = [shared["conll"], shared["finished"], shared["sc_head"]]
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures = {}
    for case in selected:
        world = World(
            tmp_path_factory.mktemp(case.id),
            tiny_bert,
            tiny_llama,
            shared["conll"],
            shared["finished"],
            shared["sc_head"],
        )
        futures[case.id] = pool.submit(_run_case, case, world, kept)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c, id=c.id, marks=[pytest.mark.xfail(reason=c.known_gap, strict=True)] if c.known_gap else []
        )
        for c in CASES
    ],
)
def test_bad_input_exits_2_naming_where_and_what_to_do(case, outcomes):
    outcome = outcomes[case.id].result(timeout=TIMEOUT_S * 4)
    out, shown = outcome.done.stdout + outcome.done.stderr, outcome.shown()
    assert "Traceback" not in out, shown
    assert outcome.done.returncode == 2, shown
    assert case.where.format(**outcome.expand) in out, shown
    assert case.hint.format(**outcome.expand) in out, shown
    # the run may write its own files (run directory, cache) beside the inputs; the inputs stay as they were
    assert {p: h for p, h in outcome.after.items() if p in outcome.before} == outcome.before, shown
    if os.environ.get("DFT_SHOW_BAD_INPUTS"):
        print(shown)
