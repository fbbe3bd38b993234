"""Which checkpoint files each rank writes and reads: each file uploaded once, each rank fetches its own."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from distributed_ft.backends.ray_train import fetch_checkpoint
from distributed_ft.train.checkpoint import needed_files, owned_files

FILES = [
    "state.json",
    "rng-rank0.pt",
    "rng-rank1.pt",
    "engine/latest",
    "engine/step10/mp_rank_00_model_states.pt",
    "engine/step10/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "engine/step10/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "engine/step10/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
]


def _checkpoint(root: Path) -> Path:
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    return root


def test_each_file_has_one_writer(tmp_path):
    checkpoint = _checkpoint(tmp_path / "step-0000010")
    written = [str(p) for rank in (0, 1) for p in owned_files(checkpoint, rank)]
    assert sorted(written) == sorted(FILES)
    assert {str(p) for p in owned_files(checkpoint, 1)} == {
        "rng-rank1.pt",
        "engine/step10/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "engine/step10/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }


def test_a_restored_rank_fetches_shared_files_and_its_own_shards_only(tmp_path):
    checkpoint = _checkpoint(tmp_path / "storage" / "step-0000010")
    target = tmp_path / "restore"
    fetched = fetch_checkpoint(pafs.LocalFileSystem(), str(checkpoint), target, rank=1)
    assert fetched == needed_files(sorted(FILES), 1)
    on_disk = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert on_disk == sorted(fetched)
    assert "rng-rank0.pt" not in on_disk and "engine/step10/mp_rank_00_model_states.pt" in on_disk
    assert not any("zero_pp_rank_0" in name for name in on_disk)
    assert (target / "engine/latest").read_text() == "engine/latest"
