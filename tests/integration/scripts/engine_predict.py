"""Reload a run's best checkpoint into a fresh engine and record what it predicts (tests only).

Usage: ``torchrun --nproc_per_node N engine_predict.py RUN_DIR OUT_DIR [--merge-lora]``. It

1. runs ``dft export RUN_DIR --out OUT_DIR/export`` under the launcher (same world size as training, so
   ZeRO-3 gathers the partitioned parameters), or ``--out OUT_DIR/merged --merge-lora`` for a PEFT run;
2. builds the run's engine with the model as the loop builds it (PEFT-wrapped when the run used PEFT),
   loads ``checkpoints/best`` and writes ``OUT_DIR/state_bytes-rankR.json``;
3. forwards every test batch on every rank (ZeRO-3 gathers need all ranks) and rank 0 saves the inputs
   and logits to ``OUT_DIR/predictions.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distributed_ft import cli
from distributed_ft.config.load import load_config
from distributed_ft.data.sources import ArrowBatchSource
from distributed_ft.engine import build_engine
from distributed_ft.modeling.build import load_tokenizer
from distributed_ft.modeling.peft import apply_peft
from distributed_ft.runtime.context import create_context
from distributed_ft.tasks import get_task
from distributed_ft.train.checkpoint import CheckpointManager
from distributed_ft.train.job import prepare_data_once


def main(run_dir: Path, out: Path, merge_lora: bool = False) -> int:
    export = ["--out", str(out / "merged"), "--merge-lora"] if merge_lora else ["--out", str(out / "export")]
    code = cli.main(["-q", "export", str(run_dir), *export])
    if code:
        return code
    context = create_context()
    config, _ = load_config(str(run_dir / "config.yaml"))
    labels = json.loads((run_dir / "labels.json").read_text())
    task = get_task(config)
    engine = build_engine(config, context)
    engine.prepare(apply_peft(task.build_model(labels), config), total_steps=1)
    engine.load(CheckpointManager(run_dir / "checkpoints", context).best)
    (out / f"state_bytes-rank{context.rank}.json").write_text(json.dumps(engine.state_bytes()))
    tokenizer = load_tokenizer(str(run_dir / "export"))
    data = prepare_data_once(task, tokenizer, {"test": config.data.test}, labels, context)
    source = ArrowBatchSource(data.splits["test"].read(), task.collate, 16, shuffle=False)
    engine.train(False)
    records = []
    with torch.no_grad():
        for batch in source:
            logits = engine.forward(batch).logits
            records.append(
                {
                    "input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"],
                    "logits": logits.float().cpu(),
                }
            )
    if context.is_main:
        torch.save(records, out / "predictions.pt")
    context.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), merge_lora="--merge-lora" in sys.argv[3:]))
