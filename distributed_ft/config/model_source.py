"""What ``model.name`` names: a local directory, a hub id or a builtin, told apart before loading it."""

from __future__ import annotations

from pathlib import Path


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path (a hub id is ``name`` or ``namespace/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def missing_model_dir(name: str) -> str | None:
    """A one-line error when ``name`` is a path with no directory there; ``None`` otherwise."""
    if name.startswith("builtin:") or not looks_like_path(name):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    what = "is a file, not a directory" if path.exists() else "does not exist"
    return (
        f"model.name={name!r}: {path} {what}; give a directory written by save_pretrained (config.json "
        "and weights), a hub id, or builtin:minilm-l6"
    )
