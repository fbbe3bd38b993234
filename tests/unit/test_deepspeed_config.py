"""The DeepSpeed JSON rendered from the typed config, user files, conflicts, and the one-importer rule."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_ft.config.deepspeed import AUTO, render_deepspeed_config
from distributed_ft.config.load import validate
from distributed_ft.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster_configs" / "deepspeed"


def job(**sections) -> object:
    raw: dict = {"run": {"engine": "deepspeed"}}
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return validate(raw)


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def _values(tree):
    for value in tree.values():
        yield from _values(value) if isinstance(value, dict) else [value]


def test_rendered_from_the_job_config():
    config = job(train__batch_size=8, train__grad_accum=4, train__max_grad_norm=0.5, deepspeed__zero_stage=3)
    ds = render_deepspeed_config(config, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW also with offload: no CPUAdam compile
    assert "optimizer" not in ds and "scheduler" not in ds
    assert AUTO not in list(_values(ds))


def test_offload_precision_and_clipping_off():
    config = job(
        deepspeed__zero_stage=3,
        deepspeed__offload_optimizer=True,
        deepspeed__offload_param=True,
        train__mixed_precision="bf16",
        train__max_grad_norm=None,
    )
    ds = render_deepspeed_config(config, world_size=1)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["pin_memory"] is False  # pinned memory only with a GPU
    assert ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.0
    assert render_deepspeed_config(config, 1, "cuda")["zero_optimization"]["offload_param"]["pin_memory"]


def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        render_deepspeed_config(job(train__mixed_precision="fp16"), world_size=1, device_type="cpu")
    assert render_deepspeed_config(job(train__mixed_precision="fp16"), 1, "cuda")["fp16"]["enabled"]


@pytest.mark.parametrize(
    ("file_key", "value", "job_key"),
    [
        ({"train_micro_batch_size_per_gpu": 8}, 8, "train.batch_size=16"),
        ({"gradient_accumulation_steps": 2}, 2, "train.grad_accum=1"),
        ({"train_batch_size": 64}, 64, "world size 2=32"),
        ({"gradient_clipping": 2.0}, 2.0, "train.max_grad_norm=1.0"),
        ({"zero_optimization": {"stage": 3}}, 3, "deepspeed.zero_stage=2"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, '"cpu"', "offload_optimizer=False"),
        ({"bf16": {"enabled": True}}, "true", "train.mixed_precision='no'"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, 0.001, "train.lr=5e-05"),
    ],
)
def test_conflicting_user_file_names_both_keys_and_values(tmp_path, file_key, value, job_key):
    path = write(tmp_path, file_key)
    with pytest.raises(ConfigError) as error:
        render_deepspeed_config(job(deepspeed__config=path), world_size=2)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert f"={value} conflicts with" in message.replace(f"={json.dumps(value)}", f"={value}")
    assert job_key in message


def test_user_file_agreeing_or_auto_values_and_extra_knobs(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 32,
        "gradient_clipping": AUTO,
        "bf16": {"enabled": AUTO},
        "optimizer": {"type": "AdamW", "params": {"lr": AUTO, "weight_decay": 0.01, "betas": [0.9, 0.999]}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": AUTO}},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": AUTO},
        "communication_data_type": "fp32",
    }
    config = job(deepspeed__config=write(tmp_path, user))
    ds = render_deepspeed_config(config, world_size=2, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 64 * 64}
    assert ds["communication_data_type"] == "fp32"
    assert "optimizer" not in ds and "scheduler" not in ds
    assert AUTO not in list(_values(ds))
    # Before the model is known, model-dependent bucket sizes may stay "auto" (early conflict check).
    early = render_deepspeed_config(config, world_size=2)
    assert early["zero_optimization"]["reduce_bucket_size"] == AUTO


def test_unresolvable_auto_optimizer_and_scheduler_values_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r'cannot resolve "auto" for communication_data_type'):
        render_deepspeed_config(job(deepspeed__config=write(tmp_path, {"communication_data_type": AUTO})), 1)
    sub_group = {"zero_optimization": {"sub_group_size": AUTO}}
    with pytest.raises(ConfigError, match=r'cannot resolve "auto" for zero_optimization\.sub_group_size'):
        render_deepspeed_config(job(deepspeed__config=write(tmp_path, sub_group)), 1, hidden_size=64)
    with pytest.raises(ConfigError, match=r"optimizer.type='Lamb' conflicts with run.engine=deepspeed"):
        render_deepspeed_config(job(deepspeed__config=write(tmp_path, {"optimizer": {"type": "Lamb"}})), 1)
    bad_scheduler = {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.1}}}
    with pytest.raises(ConfigError, match=r"scheduler\.params .* conflict with the job's schedule"):
        render_deepspeed_config(job(deepspeed__config=write(tmp_path, bad_scheduler)), 1)


def test_unreadable_user_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        render_deepspeed_config(job(deepspeed__config=str(tmp_path / "missing.json")), 1)
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        render_deepspeed_config(job(deepspeed__config=str(broken)), 1)


CLUSTER_FILES = {
    "zero1.json": {"deepspeed__zero_stage": 1},
    "zero2.json": {"deepspeed__zero_stage": 2},
    "zero3.json": {"deepspeed__zero_stage": 3},
    "zero2_offload.json": {"deepspeed__zero_stage": 2, "deepspeed__offload_optimizer": True},
    "zero3_offload.json": {
        "deepspeed__zero_stage": 3,
        "deepspeed__offload_optimizer": True,
        "deepspeed__offload_param": True,
    },
}


@pytest.mark.parametrize("name", sorted(CLUSTER_FILES))
def test_cluster_configs_render_with_the_matching_typed_keys(name):
    path = str(CLUSTER / name)
    ds = render_deepspeed_config(job(deepspeed__config=path, **CLUSTER_FILES[name]), 8, "cuda", 4096)
    assert AUTO not in list(_values(ds))
    assert ds["zero_optimization"]["stage"] == CLUSTER_FILES[name]["deepspeed__zero_stage"]
    assert ds["train_batch_size"] == 16 * 8  # batch keys are left to the job config
    if CLUSTER_FILES[name]["deepspeed__zero_stage"] != 2:  # the default stage is 2: others must be asked for
        with pytest.raises(ConfigError, match=r"zero_optimization\.stage"):
            render_deepspeed_config(job(deepspeed__config=path), 8, "cuda", 4096)


def test_only_the_engine_module_imports_deepspeed():
    package = REPO / "distributed_ft"
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                offenders.append(str(path.relative_to(REPO)))
    assert set(offenders) <= {"distributed_ft/engine/deepspeed_engine.py"}, offenders


def test_engine_module_imports_deepspeed_lazily():
    code = (
        "import sys, distributed_ft.engine.deepspeed_engine, distributed_ft.runtime.context;"
        "print('deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
