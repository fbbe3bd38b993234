"""The GPU path, checked on the CPU: tests that fail on the mistakes that only show on CUDA/NCCL.

* Collectives get tensors on ``context.device`` (NCCL has no CPU backend): a recording stand-in for
  ``torch.distributed`` and a context whose device is ``meta`` catch any CPU tensor.
* No host-device sync per micro-batch: syncs counted over N and 2N steps differ by a constant.
* The window-normalised loss gives the gradients of one big batch (partial windows included).
* Devices are always indexed; DeepSpeed's accelerator follows the context.
* Checkpoints whose pickle would run code are refused.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distributed_ft.config.load import validate
from distributed_ft.errors import CheckpointError, LaunchError
from distributed_ft.runtime import context as context_module
from distributed_ft.runtime.context import LocalContext, ProcessGroupContext, choose_device
from distributed_ft.train.step import StepTally, train_step

META = torch.device("meta")


class RecordingDist:
    """Stands in for ``torch.distributed``: an initialised 2-rank group that records every tensor."""

    class ReduceOp:
        SUM, MAX, MIN = "sum", "max", "min"

    def __init__(self) -> None:
        self.tensor_devices: list[torch.device] = []
        self.object_calls = 0

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        self.tensor_devices.append(tensor.device)

    def barrier(self) -> None:
        pass

    def all_gather_object(self, out: list, obj) -> None:
        self.object_calls += 1
        out[:] = [obj] * len(out)

    def broadcast_object_list(self, box: list, src: int = 0) -> None:
        self.object_calls += 1


class MetaTagger(nn.Module):
    """A token tagger small enough to build on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


class StubEngine:
    """Forward/backward on a module; ``step`` records the gradients instead of updating."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.grads, self.boundaries = module, None, []

    def forward(self, batch, sync_grads: bool = True):
        self.boundaries.append(sync_grads)
        return self.module(**batch)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters()}
        self.module.zero_grad(set_to_none=True)
        return torch.zeros((), device=next(self.module.parameters()).device)


def _token_task():
    from distributed_ft.tasks.token_classification import TokenClassificationTask

    return TokenClassificationTask(validate({}))


def _batch(rows: int, width: int, seed: int, device=None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (rows, width), generator=generator)
    labels[:, 0] = -100
    batch = {
        "input_ids": torch.randint(0, 50, (rows, width), generator=generator),
        "attention_mask": torch.ones(rows, width, dtype=torch.int64),
        "labels": labels,
    }
    return {k: v.to(device) for k, v in batch.items()} if device else batch


def test_collectives_and_a_loop_step_only_see_tensors_on_the_context_device(monkeypatch):
    fake = RecordingDist()
    monkeypatch.setattr(context_module, "dist", fake)
    context = ProcessGroupContext(rank=0, world_size=2, local_rank=0, device=META)

    context.all_reduce(context.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="meta"):
        context.all_reduce(torch.ones(2))  # a CPU tensor into an NCCL group: refused, named
    assert context.all_gather_object({"x": 1}) == [{"x": 1}, {"x": 1}] and fake.object_calls == 1

    module = MetaTagger().to(META)
    engine, task = StubEngine(module), _token_task()
    window = [_batch(4, 7, seed=1), _batch(4, 5, seed=2)]  # CPU batches, as the source yields them
    step = train_step(engine, task, window, context)
    assert engine.boundaries == [False, True]  # gradients synchronised at the last micro-batch only
    assert {t.device for t in (step.loss_sum, step.loss_weight, step.tokens)} == {META}
    tally = StepTally(context)
    tally.add(step)
    with pytest.raises((NotImplementedError, RuntimeError)):  # meta tensors hold no values to read back
        tally.read()
    assert fake.tensor_devices and set(fake.tensor_devices) == {META}, fake.tensor_devices


PACKAGE = str(Path(__file__).resolve().parents[2] / "distributed_ft")


def _count_host_syncs(monkeypatch) -> dict[str, int]:
    """Count the tensor methods that read device values on the host.

    ``item``/``tolist``/``cpu``/``__float__``/``__int__``/``numpy`` are counted wherever they are called;
    ``__bool__`` (``if tensor:``) only from this package's code: transformers' SDPA mask helper calls
    ``padding_mask.all()`` in every BERT forward to decide whether the mask can be skipped, a sync of the
    library's own (noted in docs/architecture.md), not of the loop.
    """
    counts: dict[str, int] = {}
    for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if _name != "__bool__" or caller.startswith(PACKAGE):
                counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize(
    "technique", [[], ["train.adversarial=pgd", "train.adversarial_steps=2"]], ids=["plain", "adversarial"]
)
def test_the_loop_reads_device_values_once_per_log_window_not_per_micro_batch(
    tiny_bert, tiny_conll, tmp_path, monkeypatch, technique
):
    from distributed_ft.config import load_config
    from distributed_ft.train.loop import train

    def run(steps: int, name: str) -> int:
        overrides = [
            f"model.name={tiny_bert}",
            f"data.train={tiny_conll['train']}",
            "data.validation=null",
            "data.test=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_train_samples=null",
            f"run.output_dir={tmp_path / name}",
            "run.progress=false",
            "train.batch_size=4",
            "train.grad_accum=2",
            f"train.max_steps={steps}",
            f"train.log_every={steps}",
            *technique,
        ]
        config, _ = load_config("ner-conll2003", overrides)
        with monkeypatch.context() as patch:
            counts = _count_host_syncs(patch)
            train(config, LocalContext(), name)
        return sum(counts.values())

    run(2, "warm")  # prepares the cache; its syncs are not counted below
    short, long = run(8, "short"), run(16, "long")
    # 8 more steps of 2 micro-batches each: with a sync per micro-batch or per step the difference would
    # be >= 8; one log window costs a constant (the tally's read)
    assert long - short <= 2, (short, long)


def test_window_normalised_loss_gives_the_gradients_of_one_big_batch():
    task, torch_module = _token_task(), MetaTagger()
    context = LocalContext()
    big = _batch(16, 9, seed=3)
    # unequal target counts per micro-batch: a per-micro-batch mean would weigh them wrongly
    big["labels"][:4, 3:] = -100
    for sizes in ([4, 4, 4, 4], [4, 4, 4], [5, 3, 4]):  # full window, partial window, uneven batches
        rows, start = [], 0
        for size in sizes:
            rows.append({k: v[start : start + size] for k, v in big.items()})
            start += size
        whole = {k: v[:start] for k, v in big.items()}
        expected = StubEngine(torch_module)
        train_step(expected, task, [whole], context)
        accumulated = StubEngine(torch_module)
        step = train_step(accumulated, task, rows, context)
        for name, grad in expected.grads.items():
            torch.testing.assert_close(accumulated.grads[name], grad, atol=1e-6, rtol=0)
        assert float(step.loss_weight) == float(task.loss_weight(whole))


def test_devices_are_indexed_and_use_gpu_true_needs_a_gpu(monkeypatch):
    assert choose_device("auto", 0) == torch.device("cpu")
    assert choose_device(False, 0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LaunchError, match=r"run\.use_gpu=true"):
        choose_device(True, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("auto", 1) == torch.device("cuda", 1)  # never the index-less "cuda"
    assert choose_device(True, 0).index == 0
    with pytest.raises(LaunchError, match="only 2 CUDA devices"):
        choose_device(True, 2)
    assert context_module.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert context_module.process_group_backend(torch.device("cpu")) == "gloo"


def test_run_use_gpu_defaults_to_auto():
    assert validate({}).run.use_gpu == "auto"
    assert validate({"run": {"use_gpu": False}}).run.use_gpu is False


def test_deepspeed_accelerator_follows_the_context_device():
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    from distributed_ft.engine.deepspeed_engine import pin_accelerator

    assert pin_accelerator("cpu") == "cpu" and get_accelerator().device_name() == "cpu"


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker file: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    from distributed_ft.runtime.safe_load import verify_torch_files
    from distributed_ft.train.checkpoint import CheckpointManager, RunState

    class Engine:
        def save(self, directory: Path) -> None:
            torch.save({"w": torch.ones(2)}, directory / "engine_state.pt")

        def load(self, directory: Path, weights_only: bool = False) -> None:
            pass

    manager = CheckpointManager(tmp_path / "checkpoints", LocalContext())
    saved = manager.save(Engine(), RunState(step=3))
    assert manager.load(Engine(), saved).step == 3  # an honest checkpoint loads (RNG files included)

    marker = tmp_path / "pwned"
    torch.save({"torch": _RunsCode(marker)}, saved / "rng-rank0.pt", pickle_protocol=2)
    with pytest.raises(CheckpointError, match=r"rng-rank0\.pt"):
        manager.load(Engine(), saved)
    assert not marker.exists()

    shard = tmp_path / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.parent.mkdir()
    torch.save({"optimizer_state_dict": {"x": torch.ones(1)}}, shard)
    verify_torch_files(shard.parent)
    with shard.open("wb") as handle:
        pickle.dump(_RunsCode(marker), handle)  # even a plain pickle file with a .pt name
    with pytest.raises(CheckpointError, match="refusing to load"):
        verify_torch_files(shard.parent)
    assert not marker.exists()


def test_rng_state_round_trips_through_the_safe_format(tmp_path):
    import random

    import numpy as np

    from distributed_ft.train.checkpoint import CheckpointManager, RunState

    class Engine:
        def save(self, directory: Path) -> None:
            (directory / "engine.json").write_text(json.dumps({}))

        def load(self, directory: Path, weights_only: bool = False) -> None:
            pass

    manager = CheckpointManager(tmp_path / "checkpoints", LocalContext())
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = manager.save(Engine(), RunState(step=1))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    manager.load(Engine(), saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


class _Rank:
    """A context of one rank in a 2-rank job whose broadcast hands out rank 0's value."""

    checkpoints_are_durable = True

    def __init__(self, rank: int, from_rank0: list) -> None:
        self.rank, self._box = rank, from_rank0

    def resume_checkpoint(self):
        return None

    def broadcast_object(self, obj):
        if self.rank == 0:
            self._box[:] = [obj]
        return self._box[0]


def test_rank_zero_chooses_the_resume_checkpoint_and_every_rank_must_hold_it(tmp_path):
    from distributed_ft.train.checkpoint import CheckpointManager, RunState, agree_on_resume

    class Engine:
        def save(self, directory: Path) -> None:
            (directory / "engine.json").write_text("{}")

    disks = {r: CheckpointManager(tmp_path / f"node{r}" / "checkpoints", LocalContext()) for r in (0, 1)}
    for step in (10, 20):
        disks[0].save(Engine(), RunState(step=step))
    disks[1].save(Engine(), RunState(step=10))  # this node's disk missed step 20
    box: list = []
    assert agree_on_resume(_Rank(0, box), disks[0], "auto").name == "step-0000020"
    with pytest.raises(
        CheckpointError, match=r"rank 0 resumes from step-0000020 but rank 1 holds step-0000010"
    ):
        agree_on_resume(_Rank(1, box), disks[1], "auto")
    fresh: list = []
    assert agree_on_resume(_Rank(0, fresh), disks[0], "never") is None
    assert agree_on_resume(_Rank(1, fresh), disks[1], "auto") is None  # rank 0 starts fresh: all do
    scratch = _Rank(0, [])
    scratch.checkpoints_are_durable = False  # Ray: scratch run directories are never resumed from
    assert agree_on_resume(scratch, disks[0], "auto") is None
