"""GPU throughput: our training loop vs a hand-written PyTorch loop vs Hugging Face ``Trainer``.

Four jobs, each trained by three loops on the same synthetic data, one loop per fresh process (so peak
memory and allocator state are the loop's own):

* (a) MiniLM-L6 NER, (b) MPNet-base NER: sentences of 20-60 tokens (CoNLL-like), batch 32;
* (c) SmolLM2-135M causal LM with LoRA (rank 16 on every attention and MLP projection), (d) the same model
  fully fine-tuned: rows of 512 tokens, batch 8.

Loops: **ours** (``dft train`` through ``distributed_ft.cli.main`` in a child process, with
``train.max_steps`` and ``train.log_every``; throughput read from its ``metrics.jsonl``), **hand-written**
(fused AdamW, bf16 autocast, gradient clipping, nothing else) and **HF Trainer** (``bf16=True``, the same
batch size and ``max_steps``, no evaluation, no saving, ``report_to`` none). All three keep fp32 master
weights with bf16 autocast, clip gradients at 1.0 and use fused AdamW.

Definitions:

* **tokens/s**: real (non-padding) tokens over the measured steps divided by their wall time; the first
  ``warmup`` steps are excluded. The hand-written loop and the Trainer callbacks call
  ``torch.cuda.synchronize()`` at both ends of the timed window. Ours: the ``tokens_per_s`` (and
  ``samples_per_s`` where logged) of its log windows after the first (which holds the warm-up steps),
  averaged with the time between those records as weights; the loop times its own windows (it reads its
  device-side tallies, a host sync, at every log line).
* **samples/s**: sentences (NER) or 512-token rows (LM) per second over the same window.
* **MFU**: ``tokens/s x FLOPs per token / 989.4 TFLOP/s`` (H200 dense bf16 peak). FLOPs per token,
  counted over the weights of the ``nn.Linear`` layers N (the matmuls: embedding lookups excluded, a tied
  LM head counted once; attention score FLOPs left out): full fine-tuning ``6 N``; LoRA ``4 N + 2 N_t``
  (forward and input gradients through every weight, weight gradients only for the N_t trainable
  adapter weights; N includes the adapters).
* **peak GiB**: ``torch.cuda.max_memory_allocated()`` of the loop's process at its end.
* **ratio**: tokens/s of a loop over the hand-written loop's on the same job.

The models are the offline packages where installed (``builtin:minilm-l6``, ``builtin:smollm2-135m``),
else randomly initialised models of the real shapes built from configs with a synthetic tokenizer whose
words are single tokens (``distributed_ft.testing.save_shaped_model``; MPNet-base always: it has no
package). Throughput does not depend on the weights.

Usage: ``python benchmarks/gpu_bench.py [--out DIR] [--quick]`` writes ``DIR/gpu-<date>.json`` and
``.md`` (default ``benchmarks/results``; a failed loop's log goes to ``DIR/gpu-bench-logs/``) and exits 1
when a loop failed; without CUDA it prints ``no CUDA device: GPU benchmark not run`` and exits 0.
About 3-5 minutes on one H200 (not yet measured there); ``--quick`` (MiniLM NER and SmolLM2 LoRA, a few
steps) aims at under a minute; ``--budget-s`` stops starting loops when the time is spent.
``--cpu-smoke`` builds every model and runs one hand-written step per job on the CPU (plus MiniLM through
ours and the Trainer; in-process except ours), writes nothing and claims no MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_CUDA = "no CUDA device: GPU benchmark not run"
PEAK_FLOPS = 989.4e12
"""H200 (and H100 SXM) dense bf16 tensor-core peak, NVIDIA datasheet."""
NER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
"""The ``instruction-tuning-lora`` recipe's adapters."""
LOOPS = {"hand": "hand-written PyTorch", "dft": "ours (dft train)", "hf": "HF Trainer"}
RESULT_MARK = "GPU_BENCH_RESULT "
BUILTINS = {"minilm": "minilm-l6", "smollm2": "smollm2-135m"}
"""The offline packages (``builtin:NAME``) that carry a benchmarked model; MPNet-base has none."""
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked job."""

    key: str
    title: str
    family: str
    """``minilm``, ``mpnet`` or ``smollm2``: which model (and tokenizer) it trains."""
    task: str
    """``ner`` or ``lm``."""
    lora: bool
    recipe: str
    lr: float


CASES = [
    Case("minilm-ner", "MiniLM-L6 NER", "minilm", "ner", False, "ner-conll2003", 5e-5),
    Case("mpnet-ner", "MPNet-base NER", "mpnet", "ner", False, "ner-conll2003", 5e-5),
    Case("smollm2-lora", "SmolLM2-135M LoRA", "smollm2", "lm", True, "instruction-tuning-lora", 2e-4),
    Case("smollm2-full", "SmolLM2-135M full FT", "smollm2", "lm", False, "instruction-tuning", 5e-5),
]


@dataclasses.dataclass
class Settings:
    """Sizes of one benchmark run."""

    mode: str
    device: str
    bf16: bool
    ner_batch: int
    lm_batch: int
    lm_seq: int
    ner_warmup: int
    ner_measure: int
    lm_warmup: int
    lm_measure: int
    worker_timeout_s: int

    def steps(self, case: Case) -> tuple[int, int]:
        """``(warm-up steps, measured steps)`` for ``case``."""
        if case.task == "ner":
            return self.ner_warmup, self.ner_measure
        return self.lm_warmup, self.lm_measure

    def batch(self, case: Case) -> int:
        return self.ner_batch if case.task == "ner" else self.lm_batch


def settings_for(mode: str) -> Settings:
    """``full`` (about 5 minutes on one H200), ``quick`` (under a minute) or ``cpu-smoke``."""
    if mode == "full":
        return Settings(mode, "cuda", True, 32, 8, 512, 10, 60, 5, 20, 240)
    if mode == "quick":
        return Settings(mode, "cuda", True, 32, 8, 512, 3, 12, 3, 6, 120)
    return Settings(mode, "cpu", False, 2, 1, 64, 1, 2, 1, 1, 180)


# --------------------------------------------------------------------------- models
def resolve_builtin(family: str) -> str | None:
    """The local directory of the offline package for ``family``, when it is installed."""
    name = BUILTINS.get(family)
    if name is None:
        return None
    try:
        from distributed_ft.data.builtin import resolve
        from distributed_ft.errors import DftError

        try:
            return resolve(f"builtin:{name}")
        except (DftError, OSError):
            return None
    except ImportError:
        return None


def flop_counts(model_dir: str, case: Case) -> dict[str, int]:
    """``nn.Linear`` weights (all / trainable) of ``case``'s model, counted on the meta device."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if case.task == "ner":
            config.num_labels = len(NER_TAGS)
            model = AutoModelForTokenClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        if case.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": sum(w.numel() for w in linear),
        "trainable_linear_params": sum(w.numel() for w in linear if w.requires_grad),
    }


def flops_per_token(counts: dict[str, int], lora: bool) -> float:
    """``6 N`` for full fine-tuning, ``4 N + 2 N_trainable`` with a frozen base (see the module docs)."""
    if lora:
        return 4.0 * counts["linear_params"] + 2.0 * counts["trainable_linear_params"]
    return 6.0 * counts["linear_params"]


# --------------------------------------------------------------------------- synthetic data
def single_token_words(model_dir: str, limit: int = 8000, seed: int = 0) -> list[tuple[str, int]]:
    """Up to ``limit`` lower-case words that the model's tokenizer turns into exactly one token each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_tokens)
    candidates = []
    for token in tokenizer.get_vocab():
        if token in special:
            continue
        word = token[1:] if token[:1] in ("Ġ", "▁") else token
        if 2 <= len(word) <= 12 and word.isascii() and word.isalpha() and word.islower():
            candidates.append(word)
    candidates = sorted(set(candidates))
    random.Random(seed).shuffle(candidates)
    candidates = candidates[: limit * 2]
    encoded = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
    words = [(w, ids[0]) for w, ids in zip(candidates, encoded, strict=True) if len(ids) == 1]
    if len(words) < 100:
        raise RuntimeError(f"{model_dir}: only {len(words)} single-token words found in its vocabulary")
    return words[:limit]


def _tags(rng: random.Random, length: int) -> list[str]:
    """Valid IOB2 tags: about 15% of words start an entity, half of those continue it."""
    tags: list[str] = []
    for _ in range(length):
        previous = tags[-1] if tags else "O"
        if previous != "O" and rng.random() < 0.5:
            tags.append("I-" + previous[2:])
        elif rng.random() < 0.15:
            tags.append("B-" + rng.choice(["PER", "ORG", "LOC", "MISC"]))
        else:
            tags.append("O")
    return tags


def write_ner_data(
    directory: Path, words: list[tuple[str, int]], count: int, seed: int = 1
) -> dict[str, str]:
    """``count`` sentences of 18-58 single-token words (20-60 tokens with [CLS]/[SEP]): CoNLL + ids."""
    rng = random.Random(seed)
    lines, sentences = [], []
    for _ in range(count):
        chosen = [rng.choice(words) for _ in range(rng.randint(18, 58))]
        tags = _tags(rng, len(chosen))
        lines += [f"{w} NN O {t}" for (w, _), t in zip(chosen, tags, strict=True)] + [""]
        sentences.append({"ids": [i for _, i in chosen], "tags": [NER_TAGS.index(t) for t in tags]})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.conll").write_text("\n".join(lines) + "\n")
    (directory / "train.ids.json").write_text(json.dumps(sentences))
    return {"conll": str(directory / "train.conll"), "ids": str(directory / "train.ids.json")}


def write_lm_data(
    directory: Path, words: list[tuple[str, int]], tokens: int, seed: int = 2
) -> dict[str, str]:
    """Prompt/response records (16 + 96 words) holding ``tokens`` words in all: JSONL + their id stream."""
    rng = random.Random(seed)
    records, stream = [], []
    while len(stream) < tokens:
        prompt = [rng.choice(words) for _ in range(16)]
        response = [rng.choice(words) for _ in range(96)]
        records.append(
            {"prompt": " ".join(w for w, _ in prompt), "response": " ".join(w for w, _ in response)}
        )
        stream += [i for _, i in prompt + response]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "train.ids.json").write_text(json.dumps(stream))
    return {"jsonl": str(directory / "train.jsonl"), "ids": str(directory / "train.ids.json")}


# --------------------------------------------------------------------------- batches (hand-written, HF)
def load_examples(spec: dict[str, Any], tokenizer) -> list[dict[str, list[int]]]:
    """The job's examples as id lists: NER sentences with [CLS]/[SEP], or LM rows of ``lm_seq`` tokens."""
    ids = json.loads(Path(spec["data"]["ids"]).read_text())
    if spec["task"] == "ner":
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        return [{"input_ids": [cls, *s["ids"], sep], "labels": [-100, *s["tags"], -100]} for s in ids]
    seq = spec["settings"]["lm_seq"]
    return [{"input_ids": ids[i : i + seq]} for i in range(0, len(ids) - seq + 1, seq)]


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right padding to the longest row; LM rows get ``labels = input_ids``."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row.get("labels", row["input_ids"]))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Shuffled full batches, epoch after epoch (the same order for every run with ``seed``)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def load_model(spec: dict[str, Any]):
    """The job's model (fp32 weights) with LoRA applied when the job uses it."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    if spec["task"] == "ner":
        model = AutoModelForTokenClassification.from_pretrained(spec["model_dir"], num_labels=len(NER_TAGS))
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    return model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _adamw(params, lr: float, device):
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True), True
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01), False


# --------------------------------------------------------------------------- the three loops
def hand_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """A minimal loop: fused AdamW, bf16 autocast, gradient clipping; timed between synchronizations."""
    import torch
    from transformers import AutoTokenizer

    settings, device = spec["settings"], torch.device(spec["settings"]["device"])
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = load_examples(spec, tokenizer)
    model = load_model(spec).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, fused = _adamw(params, spec["lr"], device)
    warmup, measure, batch_size = spec["warmup"], spec["measure"], spec["batch_size"]
    source = batches(examples, batch_size, pad_id, seed=0)
    tokens = samples = 0
    started = 0.0
    loss = None
    for step in range(warmup + measure):
        if step == warmup:
            _sync(device)
            started, tokens, samples = time.perf_counter(), 0, 0
        batch = next(source)
        tokens += int(batch["attention_mask"].sum())
        samples += batch["input_ids"].shape[0]
        if device.type == "cuda":
            batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"]):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "samples": samples,
        "seconds": seconds,
        "steps_measured": measure,
        "final_loss": float(loss.detach()) if loss is not None else None,
        "peak_bytes": _peak(device),
        "note": "fused AdamW" if fused else "AdamW (no fused kernel)",
    }


def hf_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """``transformers.Trainer`` with ``bf16=True``; a callback synchronizes and times the measured steps."""
    import inspect

    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    settings, device = spec["settings"], torch.device(spec["settings"]["device"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    warmup, measure, batch_size = spec["warmup"], spec["measure"], spec["batch_size"]
    total = warmup + measure
    examples = load_examples(spec, tokenizer)
    examples = examples[: (len(examples) // batch_size) * batch_size]  # full batches only
    counted: list[tuple[int, int]] = []  # (real tokens, samples) of each batch, in the order they are made

    def counting_collate(rows):
        batch = collate(rows, pad_id)
        counted.append((int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]))
        return batch

    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                _sync(device)
                marks["start" if state.global_step == warmup else "end"] = time.perf_counter()

    wanted = {
        "output_dir": str(Path(spec["work"]) / "hf-output"),
        "per_device_train_batch_size": batch_size,
        "max_steps": total,
        "learning_rate": spec["lr"],
        "weight_decay": 0.01,
        "warmup_steps": 0,
        "bf16": settings["bf16"],
        "optim": "adamw_torch_fused",
        "max_grad_norm": 1.0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "seed": 0,
        "use_cpu": device.type == "cpu",
    }
    accepted = inspect.signature(TrainingArguments.__init__).parameters
    arguments = TrainingArguments(**{k: v for k, v in wanted.items() if k in accepted})
    torch.manual_seed(0)
    trainer = Trainer(
        model=load_model(spec),
        args=arguments,
        train_dataset=examples,
        data_collator=counting_collate,
        callbacks=[Timer()],
    )
    output = trainer.train()
    measured = counted[warmup:total]
    return {
        "tokens": sum(t for t, _ in measured),
        "samples": sum(s for _, s in measured),
        "seconds": marks["end"] - marks["start"],
        "steps_measured": measure,
        "final_loss": float(output.training_loss),
        "peak_bytes": _peak(device),
        "note": "",
    }


def dft_overrides(spec: dict[str, Any]) -> list[str]:
    """``dft train`` overrides for the job: the recipe's model replaced, only a train split, no eval."""
    settings, work = spec["settings"], Path(spec["work"])
    common = [
        f"model.name={spec['model_dir']}",
        "data.validation=null",
        "data.test=null",
        f"data.cache_dir={work / 'dft-cache'}",
        "data.max_train_samples=null",
        "data.group_by_length=false",
        f"run.output_dir={work / 'dft-run'}",
        "run.resume=never",
        f"run.use_gpu={'true' if settings['device'] == 'cuda' else 'false'}",
        f"train.mixed_precision={'bf16' if settings['bf16'] else repr('no')}",  # a bare no is YAML false
        f"train.batch_size={spec['batch_size']}",
        f"train.max_steps={spec['warmup'] + spec['measure']}",
        f"train.log_every={spec['warmup']}",
        f"train.lr={spec['lr']}",
        "train.warmup_ratio=0.0",
        "train.eval_each_epoch=false",
    ]
    if spec["task"] == "ner":
        return [spec["recipe"], f"data.train={spec['data']['conll']}", "data.max_length=128", *common]
    return [
        spec["recipe"],
        f"data.train={spec['data']['jsonl']}",
        f"data.max_length={settings['lm_seq']}",
        "data.packing=true",
        "data.chat_template=plain",
        "data.generate_samples=0",
        *common,
    ]


def dft_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """``dft train`` in this process; throughput from the ``metrics.jsonl`` windows after the first."""
    import torch

    from distributed_ft.cli import main

    device = torch.device(spec["settings"]["device"])
    code = main(["-q", "train", *dft_overrides(spec)])
    if code != 0:
        raise RuntimeError(f"dft train exited {code}")
    run_dir = Path(spec["work"]) / "dft-run"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sorted((e for e in events if e["event"] == "train"), key=lambda e: e["step"])
    warmup, batch_size = spec["warmup"], spec["batch_size"]
    tokens = seconds = samples = 0.0
    steps = 0
    for previous, record in itertools.pairwise(train):
        if previous["step"] < warmup:
            continue
        elapsed = record["time"] - previous["time"]
        tokens += record["tokens_per_s"] * elapsed
        seconds += elapsed
        steps += record["step"] - previous["step"]
        if "samples_per_s" in record:
            samples += record["samples_per_s"] * elapsed
        else:
            samples += (record["step"] - previous["step"]) * batch_size
    if not steps:
        raise RuntimeError(f"no measured log window in {run_dir / 'metrics.jsonl'}: {train}")
    return {
        "tokens": tokens,
        "samples": samples,
        "seconds": seconds,
        "steps_measured": steps,
        "final_loss": float(train[-1]["loss"]),
        "peak_bytes": _peak(device),
        "note": "timed by its log records (ms stamps)",
    }


LOOP_FUNCTIONS = {"hand": hand_loop, "hf": hf_loop, "dft": dft_loop}


def _quiet() -> None:
    """No transformers warnings or progress bars (loading and writing weights)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one loop on one job in this process and return its measurement."""
    _quiet()
    result = LOOP_FUNCTIONS[spec["loop"]](spec)
    result["tokens_per_s"] = result["tokens"] / result["seconds"] if result["seconds"] > 0 else None
    result["samples_per_s"] = result["samples"] / result["seconds"] if result["seconds"] > 0 else None
    return result


def worker_main(spec_path: str) -> int:
    """``--worker SPEC``: one measurement in this process, printed as one ``GPU_BENCH_RESULT`` line."""
    spec = json.loads(Path(spec_path).read_text())
    result = measure(spec)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One measurement in a fresh child process (its own CUDA context and peak memory)."""
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    (work / "worker.log").write_text(done.stdout + "\n--- stderr\n" + done.stderr)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    lines = (done.stderr or done.stdout).strip().splitlines()
    errors = [line for line in lines if ": error:" in line or line.startswith(("RuntimeError", "Error"))]
    shown = " | ".join((errors or lines)[-3:])
    return {"error": f"exit {done.returncode}: {shown[-400:]}", "log": str(work / "worker.log")}


# --------------------------------------------------------------------------- the benchmark
def prepare(
    settings: Settings, cases: list[Case], work: Path, use_builtin: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Models (builtin or config-built) and synthetic data per family; FLOP counts per case."""
    from distributed_ft.testing import save_shaped_model

    families: dict[str, dict[str, Any]] = {}
    for case in cases:
        if case.family in families:
            continue
        started = time.perf_counter()
        path = resolve_builtin(case.family) if use_builtin else None
        if path is not None:
            source = f"builtin:{BUILTINS[case.family]}"
        else:
            path = str(work / "models" / case.family)
            save_shaped_model(case.family, Path(path))
            source = "config-built (random init, real shape)"
        words = single_token_words(path)
        families[case.family] = {"model_dir": path, "source": source, "words": words}
        seconds = time.perf_counter() - started
        print(f"  {case.family}: {source}, {len(words)} single-token words ({seconds:.1f} s)", flush=True)
    counts: dict[str, dict[str, Any]] = {}
    data: dict[str, dict[str, str]] = {}
    for case in cases:
        family = families[case.family]
        warmup, steps = settings.steps(case)
        batch = settings.batch(case)
        if case.task == "ner" and "ner" + case.family not in data:
            data["ner" + case.family] = write_ner_data(
                work / "data" / case.family, family["words"], batch * (warmup + steps)
            )
        if case.task == "lm" and "lm" + case.family not in data:
            rows = batch * (max(settings.lm_warmup + settings.lm_measure, warmup + steps) + 2)
            data["lm" + case.family] = write_lm_data(
                work / "data" / case.family, family["words"], rows * settings.lm_seq
            )
        counts[case.key] = {
            **flop_counts(family["model_dir"], case),
            "data": data[case.task + case.family],
            "model_dir": family["model_dir"],
            "source": family["source"],
        }
    return families, counts


def row_for(case: Case, loop: str, result: dict[str, Any], counts: dict[str, Any], cuda: bool) -> dict:
    row: dict[str, Any] = {"case": case.key, "model": case.title, "loop": loop, "loop_name": LOOPS[loop]}
    if "error" in result:
        return {**row, "status": "error", "error": result["error"]}
    flops = flops_per_token(counts, case.lora)
    tokens_per_s = result.get("tokens_per_s")
    return {
        **row,
        "status": "ok",
        "tokens_per_s": tokens_per_s,
        "samples_per_s": result.get("samples_per_s"),
        "flops_per_token": flops,
        "mfu": tokens_per_s * flops / PEAK_FLOPS if cuda and tokens_per_s else None,
        "peak_gib": result["peak_bytes"] / GiB if result.get("peak_bytes") is not None else None,
        "steps_measured": result.get("steps_measured"),
        "seconds_measured": result.get("seconds"),
        "final_loss": result.get("final_loss"),
        "note": result.get("note", ""),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "/").replace("\n", " ")


def markdown(payload: dict[str, Any]) -> str:
    """The results as a markdown report (header, one table, definitions)."""
    env = payload["environment"]
    lines = [
        f"# GPU benchmark: ours vs hand-written PyTorch vs HF Trainer ({payload['mode']})",
        "",
        f"{env['date']} · {env['device']} · torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']} · CUDA {env['cuda']} · commit {env['commit']}",
        "",
        "| model | loop | tokens/s | samples/s | MFU | peak GiB | ratio vs hand-written |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        if row["status"] != "ok":
            lines.append(
                f"| {row['model']} | {row['loop_name']} | {_cell(row.get('error', row['status']))} | | | | |"
            )
            continue
        lines.append(
            f"| {row['model']} | {row['loop_name']} | {_fmt(row['tokens_per_s'], ',.0f')} | "
            f"{_fmt(row['samples_per_s'], ',.1f')} | {_fmt(row['mfu'], '.1%')} | "
            f"{_fmt(row['peak_gib'], '.2f')} | {_fmt(row.get('ratio_vs_hand'), '.2f')} |"
        )
    lines += ["", "Models:"]
    for key, info in payload["models"].items():
        lines.append(
            f"* {key}: {info['source']}; {info['params']:,} parameters, {info['linear_params']:,} in "
            f"nn.Linear ({info['trainable_linear_params']:,} of them trained)"
        )
    s = payload["settings"]
    lines += [
        "",
        f"Settings: NER batch {s['ner_batch']} (sentences of 20-60 tokens), {s['ner_warmup']} warm-up + "
        f"{s['ner_measure']} measured steps; LM batch {s['lm_batch']} x {s['lm_seq']} tokens, "
        f"{s['lm_warmup']} warm-up + {s['lm_measure']} measured steps; bf16 autocast over fp32 weights, "
        "fused AdamW, clipping 1.0. Ours packs the LM examples into rows (position_ids restart per example, "
        "block-diagonal attention); the others train on plain 512-token rows with causal attention.",
        "",
        "Definitions: tokens/s = real (non-padding) tokens per second over the measured steps; MFU = "
        f"tokens/s x FLOPs per token / {PEAK_FLOPS / 1e12:.1f} TFLOP/s (dense bf16 peak); FLOPs per token "
        "6N (full) or 4N + 2N_trained (LoRA), N = nn.Linear weights; peak = torch.cuda.max_memory_allocated "
        "of the loop's process; ratio = tokens/s over the hand-written loop's on the same job.",
    ]
    return "\n".join(lines) + "\n"


def environment(settings: Settings) -> dict[str, Any]:
    import importlib.metadata

    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cuda = settings.device == "cuda"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (smoke run: no throughput claim)",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "accelerate": version("accelerate"),
        "python": sys.version.split()[0],
        "commit": commit or "unknown",
    }


def run_benchmark(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(NO_CUDA)
        return 0
    _quiet()
    mode = "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"
    settings = settings_for(mode)
    keys = args.cases.split(",") if args.cases else None
    if keys is None and mode == "quick":
        keys = ["minilm-ner", "smollm2-lora"]
    cases = [c for c in CASES if keys is None or c.key in keys]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dft-gpu-bench-", dir=args.work_dir))
    print(f"gpu_bench ({mode}): work directory {work}")
    try:
        _, counts = prepare(settings, cases, work, use_builtin=not args.no_builtin)
        plan = [(case, loop) for case in cases for loop in ("hand", "dft", "hf")]
        if mode == "cpu-smoke":  # every job's hand-written step; the other loops on the first job only
            plan = [(c, loop) for c, loop in plan if loop == "hand" or c.key == cases[0].key]
        rows = []
        for case, loop in plan:
            warmup, steps = settings.steps(case)
            spec = {
                "case": case.key,
                "loop": loop,
                "task": case.task,
                "lora": case.lora,
                "recipe": case.recipe,
                "lr": case.lr,
                "model_dir": counts[case.key]["model_dir"],
                "data": counts[case.key]["data"],
                "batch_size": settings.batch(case),
                "warmup": warmup,
                "measure": steps,
                "settings": dataclasses.asdict(settings),
                "work": str(work / "runs" / f"{case.key}-{loop}"),
            }
            timeout = float(settings.worker_timeout_s)
            if args.budget_s is not None:
                timeout = min(timeout, args.budget_s - (time.perf_counter() - started) - 5)
            t0 = time.perf_counter()
            if timeout < 15:
                result: dict[str, Any] = {"error": "skipped: the time budget (--budget-s) is spent"}
            elif mode == "cpu-smoke" and loop != "dft":  # in-process: the smoke stays under a minute
                try:
                    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
                    result = measure(spec)
                except Exception as exc:  # a smoke failure is reported, not raised
                    result = {"error": f"{type(exc).__name__}: {exc}"}
            else:
                result = run_worker(spec, timeout)
                if "log" in result and mode != "cpu-smoke":  # keep a failed worker's log with the results
                    logs = Path(args.out) / "gpu-bench-logs"
                    logs.mkdir(parents=True, exist_ok=True)
                    kept = shutil.copy(result.pop("log"), logs / f"{case.key}-{loop}.log")
                    result["error"] += f" (log: {kept})"
            row = row_for(case, loop, result, counts[case.key], cuda=mode != "cpu-smoke")
            rows.append(row)
            shown = row.get("error") or (
                f"{_fmt(row['tokens_per_s'], ',.0f')} tokens/s, {_fmt(row['samples_per_s'], ',.1f')} "
                f"samples/s, MFU {_fmt(row['mfu'], '.1%')}, peak {_fmt(row['peak_gib'], '.2f')} GiB"
            )
            seconds = time.perf_counter() - t0
            print(f"  {case.title:<22} {LOOPS[loop]:<22} {shown}  ({seconds:.1f} s)", flush=True)
        for row in rows:
            hand = next((r for r in rows if r["case"] == row["case"] and r["loop"] == "hand"), None)
            if row["status"] == "ok" and hand and hand["status"] == "ok" and hand["tokens_per_s"]:
                row["ratio_vs_hand"] = row["tokens_per_s"] / hand["tokens_per_s"]
        payload = {
            "benchmark": "gpu",
            "mode": mode,
            "environment": environment(settings),
            "peak_flops": PEAK_FLOPS,
            "settings": dataclasses.asdict(settings),
            "models": {
                key: {k: v for k, v in info.items() if k not in ("data", "model_dir")}
                for key, info in counts.items()
            },
            "rows": rows,
            "seconds": round(time.perf_counter() - started, 1),
        }
        report = markdown(payload)
        print(report)
        if mode != "cpu-smoke":
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = out / f"gpu-{datetime.date.today().isoformat()}"
            stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
            stem.with_suffix(".md").write_text(report)
            print(f"wrote {stem}.json and {stem}.md ({payload['seconds']:.0f} s)")
        failed = [r for r in rows if r["status"] != "ok"]
        return 1 if failed else 0
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results directory")
    parser.add_argument("--quick", action="store_true", help="MiniLM NER + SmolLM2 LoRA, few steps (< 60 s)")
    parser.add_argument("--cpu-smoke", action="store_true", help="every model built, one CPU step each")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(c.key for c in CASES)}")
    parser.add_argument("--budget-s", type=float, help="stop starting measurements after this many seconds")
    parser.add_argument("--no-builtin", action="store_true", help="config-built models even where packaged")
    parser.add_argument("--work-dir", help="where the temporary models, data and runs go (default: $TMPDIR)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (worker logs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    return run_benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
