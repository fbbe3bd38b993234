"""Tiny models, tokenizers and corpora for tests and benchmarks, all built locally (nothing is downloaded).

torch, transformers and tokenizers are imported inside the functions, so importing this module stays
light; nothing in the library imports it. Every builder is deterministic: the same arguments give the same
vocabulary, the same weights (``torch.manual_seed(seed)`` right before the model is constructed) and the
same files.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENTITY_WORDS = {
    "PER": ["john", "mary", "smith", "peter", "anna", "blackburn"],
    "LOC": ["paris", "london", "germany", "berlin", "brussels", "york"],
    "ORG": ["eu", "reuters", "uefa", "nato", "siemens", "fifa"],
}
"""The entity words of :func:`make_conll`, by type."""
FILLER = ["the", "said", "in", "on", "a", "visited", "met", "with", "from", "to", "and", "of", "."]
"""The words of :func:`make_conll` tagged ``O``."""
INSTRUCTIONS = Path(__file__).resolve().parent / "data" / "samples" / "instructions"
"""The packaged sample instruction set (``train``/``validation``/``test`` JSONL)."""
PROMPT_HEADERS = ["### System:\n", "### Instruction:\n", "### Response:\n"]
"""The prompt template's section headers, added to the BPE training texts."""
LETTERS = "abcdefghijklmnopqrstuvwxyz"
BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
MPNET_SPECIALS = {
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "sep_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
"""MPNet's own special-token order: ``<s>``=0, ``<pad>``=1 (its padding_idx), ``</s>``=2, ``<unk>``=3."""
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
"""The tiny BERT of :func:`make_tiny_bert` (its vocabulary is the tokenizer's)."""
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
"""The tiny Llama of :func:`make_tiny_llama` (its vocabulary is the tokenizer's)."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """A real model's architecture: its config values (the rest are the config class's defaults)."""

    title: str
    architecture: str
    """``bert``, ``mpnet`` or ``llama``."""
    vocab_size: int
    config: dict[str, Any]


SHAPES = {
    "minilm": Shape(
        "MiniLM-L6",
        "bert",
        30522,
        {
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "max_position_embeddings": 512,
        },
    ),
    # the MPNetConfig defaults are MPNet-base: 12 x 768, 12 heads, FFN 3072, vocab 30527
    "mpnet": Shape("MPNet-base", "mpnet", 30527, {}),
    "smollm2": Shape(
        "SmolLM2-135M",
        "llama",
        49152,
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
    ),
}
"""Real architectures by family, for randomly initialised models of their shapes."""


# --------------------------------------------------------------------------- corpora
def make_conll(path: Path, sentences: int, seed: int, docstart: bool = True) -> Path:
    """Write a learnable NER corpus: entity words always carry their type; PER names come in pairs."""
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


def instruction_texts() -> list[str]:
    """Every field of the sample instruction set (all splits), plus the prompt headers."""
    texts = [
        value
        for split in ("train", "validation", "test")
        for line in (INSTRUCTIONS / f"{split}.jsonl").read_text().splitlines()
        for value in json.loads(line).values()
    ]
    return texts + PROMPT_HEADERS


# --------------------------------------------------------------------------- tokenizers
def make_tokenizer() -> Any:
    """Build a WordPiece BERT tokenizer whose vocabulary splits some corpus words into several sub-tokens."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER]
    vocab += [w for words in ENTITY_WORDS.values() for w in words if len(w) <= 5]
    vocab += ["black", "##burn", "bru", "##ss", "##els", "germ", "##any", "sie", "##mens", "reu", "##ters"]
    vocab += list(LETTERS) + [f"##{c}" for c in LETTERS]
    return BertTokenizerFast(
        vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, do_lower_case=True
    )


def make_bpe_tokenizer(texts: list[str], vocab_size: int = 600) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` (``<s>`` prepended, ``</s>`` ends, ``<pad>`` pads)."""
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


def make_instruction_tokenizer(vocab_size: int = 600) -> Any:
    """Train :func:`make_bpe_tokenizer` on the sample instruction set (:func:`instruction_texts`)."""
    return make_bpe_tokenizer(instruction_texts(), vocab_size)


def letters_word(index: int) -> str:
    """Return ``x`` + ``index`` in base 26 (``xa``, ``xb``, ...): distinct lower-case alphabetic words."""
    out = ""
    while True:
        index, digit = divmod(index, 26)
        out = chr(ord("a") + digit) + out
        if index == 0:
            return "x" + out


def make_wordpiece_tokenizer(vocab_size: int, specials: dict[str, str]) -> Any:
    """Build a BERT WordPiece tokenizer of exactly ``vocab_size`` entries (letters, ``##`` letters, words)."""
    from transformers import BertTokenizerFast

    vocab = list(dict.fromkeys(specials.values()))
    vocab += list(LETTERS) + [f"##{c}" for c in LETTERS]
    index = 0
    while len(vocab) < vocab_size:
        vocab.append(letters_word(index))
        index += 1
    return BertTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)},
        do_lower_case=True,
        model_input_names=["input_ids", "attention_mask"],
        **specials,
    )


def make_wordlevel_tokenizer(vocab_size: int) -> Any:
    """Build a whitespace word-level tokenizer of ``vocab_size`` entries (``<pad> <s> </s> <unk>`` first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for index in range(vocab_size - len(specials)):
        vocab[letters_word(index)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def full_vocab_tokenizer(family: str) -> Any:
    """A synthetic tokenizer covering the whole vocabulary of ``family`` (a key of :data:`SHAPES`)."""
    shape = SHAPES[family]
    if shape.architecture == "llama":
        return make_wordlevel_tokenizer(shape.vocab_size)
    specials = MPNET_SPECIALS if shape.architecture == "mpnet" else BERT_SPECIALS
    return make_wordpiece_tokenizer(shape.vocab_size, specials)


# --------------------------------------------------------------------------- models
def _model_classes(architecture: str) -> tuple[Any, Any]:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, MPNetConfig, MPNetModel

    return {
        "bert": (BertConfig, BertModel),
        "mpnet": (MPNetConfig, MPNetModel),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[architecture]


def save_model(
    directory: Path, architecture: str, tokenizer: Any, config: dict[str, Any], seed: int = 0
) -> Path:
    """Save a randomly initialised ``architecture`` model of ``config`` and ``tokenizer`` in ``directory``.

    Llama configs get the tokenizer's ``bos``/``eos``/``pad`` token ids.
    """
    import torch

    config_class, model_class = _model_classes(architecture)
    if architecture == "llama":
        config = {
            **config,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_class(config_class(**config)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_bert(
    directory: Path, seed: int = 0, tokenizer: Any = None, max_position_embeddings: int = 128
) -> Path:
    """Save a random 2-layer, 64-wide BERT + a tokenizer (default :func:`make_tokenizer`) in ``directory``."""
    tokenizer = make_tokenizer() if tokenizer is None else tokenizer
    config = {
        "vocab_size": len(tokenizer),
        **TINY_BERT,
        "max_position_embeddings": max_position_embeddings,
    }
    return save_model(directory, "bert", tokenizer, config, seed)


def make_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Save a random 2-layer, 64-wide Llama + a BPE tokenizer trained on the sample instruction set."""
    tokenizer = make_instruction_tokenizer()
    return save_model(directory, "llama", tokenizer, {"vocab_size": len(tokenizer), **TINY_LLAMA}, seed)


def save_shaped_model(family: str, directory: Path, tokenizer: Any = None, seed: int = 0) -> Path:
    """Save a random model of ``family``'s real shape (a key of :data:`SHAPES`) and a tokenizer.

    Args:
        family: ``minilm``, ``mpnet`` or ``smollm2``.
        directory: where ``save_pretrained`` writes (created).
        tokenizer: saved with the model; default :func:`full_vocab_tokenizer`. A smaller tokenizer leaves
            the rows beyond its vocabulary unused (the model keeps the real vocabulary size).
        seed: ``torch.manual_seed`` before the model is constructed.

    Returns:
        ``directory``.
    """
    shape = SHAPES[family]
    tokenizer = full_vocab_tokenizer(family) if tokenizer is None else tokenizer
    config = {"vocab_size": shape.vocab_size, **shape.config}
    return save_model(directory, shape.architecture, tokenizer, config, seed)


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by ``tensors`` (``numel x element_size``; ``None`` entries are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
