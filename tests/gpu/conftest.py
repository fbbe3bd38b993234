"""The GPU suite's fixtures: the CUDA gate, real-architecture models built from configs, suite notes.

Every test under ``tests/gpu`` is marked ``gpu``; without a CUDA device each one is skipped at collection
with the reason ``no CUDA device: the GPU suite has not run`` (nothing heavy is imported to decide that
beyond torch, and DeepSpeed or Ray are never imported at module level).

The offline model packages (``builtin:minilm-l6``, ``builtin:smollm2-135m``) are used where they are
installed; elsewhere (the lent GPU machine has neither) randomly initialised models of the same shapes are
built from configs by ``distributed_ft.testing.save_shaped_model`` and saved next to a small locally built
fast tokenizer (the unused vocabulary rows stay). Which one was used is printed in the terminal summary
("GPU suite notes").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distributed_ft.testing import SHAPES, make_instruction_tokenizer, make_tokenizer, save_shaped_model

HERE = Path(__file__).resolve().parent
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


def builtin_model(name: str) -> str | None:
    """The local path of ``builtin:NAME`` when its package is installed, else ``None``."""
    from distributed_ft.data.builtin import resolve
    from distributed_ft.errors import DftError

    try:
        return resolve(f"builtin:{name}")
    except (DftError, ImportError, OSError):
        return None


def builtin_or_shaped(
    family: str, name: str, tmp_path_factory, tokenizer: Callable[[], Any], how: str
) -> str:
    """``builtin:NAME`` when its package is installed, else a random model of ``family``'s shape (noted)."""
    title = SHAPES[family].title
    path = builtin_model(name)
    if path is not None:
        note(f"{title}: builtin:{name} ({path})")
        return f"builtin:{name}"
    directory = save_shaped_model(family, tmp_path_factory.mktemp(f"{family}-shaped"), tokenizer())
    note(f"{title}: builtin:{name} not installed; using {how}")
    return str(directory)


@pytest.fixture(scope="session")
def notes():
    """``notes(line)`` keeps a line for the terminal summary."""
    return note


@pytest.fixture(scope="session")
def minilm_model(tmp_path_factory) -> str:
    """``model.name`` of MiniLM-L6: the offline package when installed, else a config-built copy."""
    how = "a random BERT of its shape built from a config"
    return builtin_or_shaped("minilm", "minilm-l6", tmp_path_factory, make_tokenizer, how)


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory) -> str:
    """``model.name`` of SmolLM2-135M: the offline package when installed, else a config-built copy."""
    how = (
        "a random Llama of its shape built from a config with a byte-level BPE tokenizer trained on the "
        "sample instructions"
    )
    return builtin_or_shaped("smollm2", "smollm2-135m", tmp_path_factory, make_instruction_tokenizer, how)
