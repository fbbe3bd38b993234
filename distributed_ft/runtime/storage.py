"""Durable run storage: a local path, NFS, or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``hdfs://``).

What a user keeps from a Ray run (``results.json``, ``metrics.jsonl``, ``config.yaml``, ``labels.json``,
``export/``) is uploaded here by rank 0, next to the checkpoints Ray persists, because the nodes that train
need not share a disk with the driver or with each other. The same helpers let ``dft predict`` /
``evaluate`` / ``export`` read a run straight from storage. S3 endpoints and credentials come from the usual
AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), as for Ray itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from distributed_ft.errors import ConfigError

RUN_FILES = ("config.yaml", "labels.json", "metrics.jsonl", "results.json")
"""Small files of a run directory that are persisted (``export/`` is a directory, persisted at the end)."""
FINAL_DIRS = ("export", "tensorboard", "report")
"""Directories of a run persisted at its end: the model, TensorBoard's event files, the run report.
(``mlruns/``, a local MLflow store, is not: under Ray give ``track.mlflow_tracking_uri`` a shared store.)"""


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names a remote filesystem (``scheme://...``) rather than a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def _filesystem(location: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path within it)`` for a URI or a local path."""
    import pyarrow.fs as pafs

    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"cannot open storage {location!r}: {exc}") from exc
    return pafs.LocalFileSystem(), str(local_path(location))


def local_path(location: str | Path) -> Path:
    """The absolute path of a local location (a path or a ``file://`` URI)."""
    return Path(os.path.abspath(str(location).removeprefix("file://")))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a URI or a local path."""
    return "/".join([str(location).rstrip("/"), *parts])


def upload(local: Path, location: str) -> None:
    """Copy a file or a directory tree to ``location`` (replacing what is there)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    if local.is_dir():
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with local.open("rb") as source, fs.open_output_stream(path) as target:
        shutil.copyfileobj(source, target)


def link_tree(source: Path, target: Path) -> int:
    """Put the files of the directory ``source`` under the local directory ``target``; returns bytes copied.

    Each file is hard-linked (free, and safe for files never rewritten in place, such as checkpoint
    files), or copied where ``target`` is on another filesystem. A file already at ``target`` is replaced.
    """
    copied = 0
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.unlink(missing_ok=True)
        try:
            os.link(file, destination)
        except OSError:  # another device (EXDEV), or a filesystem without hard links
            shutil.copy2(file, destination)
            copied += destination.stat().st_size
    target.mkdir(parents=True, exist_ok=True)
    return copied


def download(location: str, local: Path) -> Path:
    """Copy the file or directory tree at ``location`` to ``local``; returns ``local``."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{location} does not exist")
    if info.type == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(path) as source, local.open("wb") as target:
            shutil.copyfileobj(source, target)
    return local


def read_text(location: str) -> str | None:
    """The text of the file at ``location``, or ``None`` when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as source:
        return source.read().decode("utf-8")


def persist_run(run_dir: Path, location: str, final: bool) -> None:
    """Upload a run directory's small files (and, when ``final``, :data:`FINAL_DIRS`) to ``location``."""
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            upload(run_dir / name, join(location, name))
    for name in FINAL_DIRS if final else ():
        if (run_dir / name).is_dir():
            upload(run_dir / name, join(location, name))


def download_parts(location: str, target: Path, names: tuple[str, ...]) -> Path:
    """Download the entries ``names`` of the directory at ``location`` into ``target``; returns ``target``.

    Entries that do not exist are skipped (e.g. no ``labels.json`` for causal LM).
    """
    for name in names:
        try:
            download(join(location, name), target / name)
        except ConfigError:
            continue
    return target


def fetch_run(location: str, run_dir: Path) -> Path:
    """Download a persisted run's files and :data:`FINAL_DIRS` (not its checkpoints) into ``run_dir``."""
    return download_parts(location, run_dir, (*RUN_FILES, *FINAL_DIRS))


def local_copy(location: str, parts: tuple[str, ...] = (), cache_root: Path | None = None) -> Path:
    """A local copy of a run or model directory on storage, downloaded once per location.

    ``parts`` limits the copy to those entries (e.g. ``config.yaml`` and ``export`` for prediction, not the
    checkpoints); entries that do not exist are skipped; an empty ``parts`` copies everything.
    """
    root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distributed_ft"
    key = hashlib.sha256("\n".join([location, *parts]).encode()).hexdigest()[:16]
    target = root / "storage" / key
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        if parts:
            download_parts(location, target, parts)
        else:
            download(location, target)
        target.mkdir(parents=True, exist_ok=True)
        (target / ".complete").write_text(location)
    return target
