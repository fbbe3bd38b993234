"""Shared fixtures: a tiny BERT saved with save_pretrained and a tiny CoNLL corpus, all built locally."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

ENTITY_WORDS = {
    "PER": ["john", "mary", "smith", "peter", "anna", "blackburn"],
    "LOC": ["paris", "london", "germany", "berlin", "brussels", "york"],
    "ORG": ["eu", "reuters", "uefa", "nato", "siemens", "fifa"],
}
FILLER = ["the", "said", "in", "on", "a", "visited", "met", "with", "from", "to", "and", "of", "."]


def make_conll(path: Path, sentences: int, seed: int, docstart: bool = True) -> Path:
    """A learnable NER corpus: entity words always carry their type; PER names come in pairs."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for _ in range(sentences):
        words: list[tuple[str, str]] = []
        for _ in range(rng.randint(3, 9)):
            if rng.random() < 0.3:
                kind = rng.choice(sorted(ENTITY_WORDS))
                span = 2 if kind == "PER" else 1
                for i in range(span):
                    words.append((rng.choice(ENTITY_WORDS[kind]), ("B-" if i == 0 else "I-") + kind))
            else:
                words.append((rng.choice(FILLER), "O"))
        lines += [f"{w} NN O {t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_tokenizer(directory: Path):
    """A WordPiece BERT tokenizer whose vocabulary splits some words into several sub-tokens."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER]
    whole = [w for words in ENTITY_WORDS.values() for w in words if len(w) <= 5]
    vocab += whole
    vocab += ["black", "##burn", "bru", "##ss", "##els", "germ", "##any", "sie", "##mens", "reu", "##ters"]
    vocab += list("abcdefghijklmnopqrstuvwxyz") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    return BertTokenizerFast(
        vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, do_lower_case=True
    )


def make_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer, 64-wide BERT + tokenizer with save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_conll(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conll")
    return {
        "train": make_conll(root / "train.conll", 240, seed=1),
        "validation": make_conll(root / "valid.conll", 60, seed=2),
        "test": make_conll(root / "test.conll", 60, seed=3),
    }


@pytest.fixture
def tiny_job(tiny_bert, tiny_conll, tmp_path) -> list[str]:
    """Overrides for a fast NER job on the tiny model and corpus (a packaged recipe underneath)."""
    return [
        f"model.name={tiny_bert}",
        f"data.train={tiny_conll['train']}",
        f"data.validation={tiny_conll['validation']}",
        f"data.test={tiny_conll['test']}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp_path / 'run'}",
        "run.progress=false",
        "train.epochs=3",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.log_every=1",
    ]


INSTRUCTIONS = Path(__file__).resolve().parents[1] / "distributed_ft" / "data" / "samples" / "instructions"


def make_bpe_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on ``texts`` (``<s>`` prepended, ``</s>`` ends, ``<pad>`` pads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer, 64-wide Llama + a BPE tokenizer trained on the sample set."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    texts = [
        value
        for split in ("train", "validation", "test")
        for line in (INSTRUCTIONS / f"{split}.jsonl").read_text().splitlines()
        for value in json.loads(line).values()
    ]
    texts += ["### System:\n", "### Instruction:\n", "### Response:\n"]
    tokenizer = make_bpe_tokenizer(texts)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
