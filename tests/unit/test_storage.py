"""runtime/storage.py: local locations and the hard-link upload of checkpoint files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from distributed_ft.runtime import storage


def _checkpoint(root: Path) -> Path:
    (root / "shards").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"w" * 1000)
    (root / "shards" / "rank1.pt").write_bytes(b"s" * 10)
    return root


def test_link_tree_links_every_file_on_one_filesystem(tmp_path):
    source = _checkpoint(tmp_path / "ckpt")
    target = tmp_path / "store" / "step-10"
    assert storage.link_tree(source, target) == 0  # nothing copied
    for name in ("model.safetensors", "shards/rank1.pt"):
        assert os.path.samefile(source / name, target / name)
    (source / "model.safetensors").unlink()  # the scratch copy goes; storage keeps the file
    assert (target / "model.safetensors").read_bytes() == b"w" * 1000


def test_link_tree_copies_across_filesystems_and_replaces_what_is_there(tmp_path, monkeypatch):
    source = _checkpoint(tmp_path / "ckpt")
    target = tmp_path / "store"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert storage.link_tree(source, target) == 1010
    assert (target / "model.safetensors").read_bytes() == b"w" * 1000
    assert not os.path.samefile(source / "model.safetensors", target / "model.safetensors")


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_local_path_accepts_paths_and_file_uris(tmp_path, prefix):
    assert storage.local_path(f"{prefix}{tmp_path}/run") == tmp_path / "run"
    assert not storage.is_uri(f"{prefix}{tmp_path}")
