"""The GPU suite's fixtures: the CUDA gate, real-architecture models built from configs, suite notes.

Every test under ``tests/gpu`` is marked ``gpu``; without a CUDA device each one is skipped at collection
with the reason ``no CUDA device: the GPU suite has not run`` (nothing heavy is imported to decide that
beyond torch, and DeepSpeed or Ray are never imported at module level).

The offline model packages (``builtin:minilm-l6``, ``builtin:smollm2-135m``) are used where they are
installed; elsewhere (the lent GPU machine has neither) randomly initialised models of the same shapes are
built from configs and saved with ``save_pretrained`` next to a locally built fast tokenizer. Which one
was used is printed in the terminal summary ("GPU suite notes").
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NO_CUDA = "no CUDA device: the GPU suite has not run"
NOTES: list[str] = []
"""Lines printed after the run (which models were used, measured ratios)."""


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items) -> None:
    """Mark this directory's tests ``gpu`` and skip them all when there is no CUDA device."""
    mine = [item for item in items if HERE in Path(item.path).resolve().parents]
    if not mine:
        return
    cuda = _cuda_available()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if not cuda:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def pytest_terminal_summary(terminalreporter) -> None:
    if NOTES:
        terminalreporter.section("GPU suite notes")
        for line in NOTES:
            terminalreporter.write_line(line)


def note(line: str) -> None:
    """Keep ``line`` for the terminal summary (and print it for ``-s`` runs)."""
    NOTES.append(line)
    print(line)


def shared_helpers():
    """``tests/conftest.py`` as a module (pytest drops plain ``conftest`` from ``sys.modules``)."""
    name = "dft_tests_shared_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def builtin_model(name: str) -> str | None:
    """The local path of ``builtin:NAME`` when its package is installed, else ``None``."""
    from distributed_ft.data.builtin import resolve
    from distributed_ft.errors import DftError

    try:
        return resolve(f"builtin:{name}")
    except (DftError, ImportError, OSError):
        return None


def build_minilm_shaped(directory: Path) -> Path:
    """A random BERT of MiniLM-L6's shape (6 x 384, 12 heads, FFN 1536, vocab 30522) + a small tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = shared_helpers().make_tokenizer(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_smollm2_shaped(directory: Path) -> Path:
    """A random Llama of SmolLM2-135M's shape + a byte-level BPE tokenizer trained on the sample set.

    SmolLM2-135M: hidden 576, FFN 1536, 30 layers, 9 heads (3 key/value heads), vocab 49152, tied
    embeddings, 2048 positions. The tokenizer is smaller than the vocabulary; the unused rows stay.
    """
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    helpers = shared_helpers()
    directory.mkdir(parents=True, exist_ok=True)
    texts = [
        value
        for split in ("train", "validation", "test")
        for line in (helpers.INSTRUCTIONS / f"{split}.jsonl").read_text().splitlines()
        for value in json.loads(line).values()
    ]
    texts += ["### System:\n", "### Instruction:\n", "### Response:\n"]
    tokenizer = helpers.make_bpe_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def notes():
    """``notes(line)`` keeps a line for the terminal summary."""
    return note


@pytest.fixture(scope="session")
def minilm_model(tmp_path_factory) -> str:
    """``model.name`` of MiniLM-L6: the offline package when installed, else a config-built copy."""
    path = builtin_model("minilm-l6")
    if path is not None:
        note(f"MiniLM-L6: builtin:minilm-l6 ({path})")
        return "builtin:minilm-l6"
    directory = build_minilm_shaped(tmp_path_factory.mktemp("minilm-shaped"))
    note("MiniLM-L6: builtin:minilm-l6 not installed; using a random BERT of its shape built from a config")
    return str(directory)


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory) -> str:
    """``model.name`` of SmolLM2-135M: the offline package when installed, else a config-built copy."""
    path = builtin_model("smollm2-135m")
    if path is not None:
        note(f"SmolLM2-135M: builtin:smollm2-135m ({path})")
        return "builtin:smollm2-135m"
    directory = build_smollm2_shaped(tmp_path_factory.mktemp("smollm2-shaped"))
    note(
        "SmolLM2-135M: builtin:smollm2-135m not installed; using a random Llama of its shape built from a "
        "config with a byte-level BPE tokenizer trained on the sample instructions"
    )
    return str(directory)
