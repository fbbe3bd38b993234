"""``dft evaluate`` and ``dft predict``: score or apply a trained model (a run directory or a model dir)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from distributed_ft.config.load import apply_override, validate
from distributed_ft.config.schema import JobConfig
from distributed_ft.data.gazetteer import file_digest, load_gazetteer
from distributed_ft.data.sources import ArrowBatchSource
from distributed_ft.engine.torch_engine import inference_engine
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.modeling import gazetteer
from distributed_ft.modeling.build import load_trained
from distributed_ft.modeling.peft import adapter_task, is_adapter_dir
from distributed_ft.runtime import storage
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.runtime.tracking import Progress
from distributed_ft.tasks.base import Generates
from distributed_ft.train.evaluate import evaluate
from distributed_ft.train.job import load_task, prepare_data_once

log = logging.getLogger("distributed_ft")


def locate_model(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, JobConfig]:
    """The model directory and job config of a run directory (``config.yaml`` + ``export/``) or model dir.

    ``path`` may be a storage URI (``s3://...``, what a Ray run prints): it is downloaded once (the run's
    config and export, not its checkpoints) and read from the local copy.
    """
    if storage.is_uri(path):
        copy = storage.local_copy(path, parts=("config.yaml", "labels.json", "export"))
        path = str(copy if (copy / "config.yaml").is_file() else storage.local_copy(path))
    root = Path(path)
    if (root / "config.yaml").is_file() and (root / "export").is_dir():
        raw = yaml.safe_load((root / "config.yaml").read_text())
        model_dir = root / "export"
    elif (root / "config.json").is_file() or is_adapter_dir(root):
        raw, model_dir = {}, root
        if is_adapter_dir(root) and adapter_task(root):  # an adapter export knows its task
            raw["task"] = adapter_task(root)
    else:
        raise ConfigError(
            f"{path!r} is neither a run directory (config.yaml + export/) nor a model directory "
            "(config.json, or adapter_config.json for an adapter)"
        )
    for assignment in overrides:
        apply_override(raw, assignment)
    return model_dir, with_export_gazetteer(validate(raw), model_dir)


def with_export_gazetteer(config: JobConfig, model_dir: Path) -> JobConfig:
    """``config`` matching the words to the gazetteer copy the export holds (none if it records none).

    The features are recomputed from the raw words with the file and options the model was trained with,
    whatever ``data.gazetteer`` the run's config names (that path may not exist where this runs).

    Raises:
        ConfigError: The export records a gazetteer whose file is missing or has other types.
    """
    if config.task != "token_classification":
        return config
    found = gazetteer.recorded_file(model_dir)
    if found is None:
        if config.data.gazetteer:
            log.warning("%s has no gazetteer embedding: data.gazetteer is ignored", model_dir)
        update = {"gazetteer": None, "gazetteer_lowercase": False}
    else:
        path, record = found
        lowercase = bool(record.get("lowercase", False))
        types = list(load_gazetteer(path, lowercase).types)
        if types != list(record.get("types", [])):
            raise ConfigError(
                f"{path} has the types {types}, but the model was trained with {record.get('types')} "
                f"({gazetteer.CONFIG_KEY} in {model_dir}/config.json): put back the file it was trained with"
            )
        if record.get("sha256") and file_digest(path) != record["sha256"]:
            log.warning("%s differs from the gazetteer the model was trained with (same types)", path)
        update = {"gazetteer": str(path), "gazetteer_lowercase": lowercase}
    return config.model_copy(update={"data": config.data.model_copy(update=update)})


def evaluate_model(
    path: str, overrides: list[str] | tuple[str, ...], context: RuntimeContext
) -> dict[str, Any]:
    """Metrics of a trained model on ``data.test`` (default: the run's own test file)."""
    model_dir, config = locate_model(path, overrides)
    if not config.data.test:
        raise ConfigError("no test data: pass data.test=FILE")
    tokenizer, task = load_task(config, str(model_dir))
    model = load_trained(config.task, str(model_dir))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data = prepare_data_once(task, tokenizer, {"test": config.data.test}, labels, context)
    engine = inference_engine(model, config, context)
    progress = Progress(config.run.progress, context)
    return evaluate(
        engine,
        task,
        data.splits["test"].read(),
        labels,
        context,
        batch_size=config.eval.batch_size,
        progress=progress,
        desc="test",
    )


def predict_file(
    path: str,
    input_path: str,
    input_format: str,
    output_path: str | None,
    context: RuntimeContext,
    overrides: list[str] | tuple[str, ...] = (),
) -> int:
    """Predict every example of ``input_path``; writes to ``output_path`` (stdout when ``None``).

    Returns:
        The number of examples predicted.
    """
    if not Path(input_path).is_file():
        raise DataError(f"--input {input_path}: no such file; give the path of a file to predict")
    model_dir, config = locate_model(path, overrides)
    tokenizer, task = load_task(config, str(model_dir))
    model = load_trained(config.task, str(model_dir))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    inputs = task.read_unlabeled(input_path, input_format, tokenizer)
    encoded = task.encode_unlabeled(inputs, tokenizer)
    engine = inference_engine(model, config, context)
    source = ArrowBatchSource(
        encoded, lambda rows: task.collate(rows, with_meta=True), config.eval.batch_size, shuffle=False
    )
    predictions: dict[int, Any] = {}
    progress = Progress(config.run.progress, context)
    engine.train(False)
    import torch

    if isinstance(task, Generates):  # generative tasks decode instead of one forward pass
        predictions = task.generate(engine.module, encoded, config.eval.batch_size, progress)
    else:
        with torch.no_grad():
            for batch in progress.wrap(iter(source), total=len(source), desc="predict"):
                meta = batch.pop("meta")
                outputs = engine.forward(batch)
                predictions.update(task.predictions(outputs, {**batch, "meta": meta}))
    task.write_predictions(inputs, predictions, labels, output_path, input_format)
    return len(predictions)
