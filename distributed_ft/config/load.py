"""Build a :class:`JobConfig` from a packaged recipe or a YAML file plus dotted ``key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distributed_ft.config.schema import DATA_SECTIONS, JobConfig, key_owners
from distributed_ft.errors import ConfigError

log = logging.getLogger("distributed_ft")
DEFAULT_RECIPE = "ner-conll2003"
SPLITS = ("train", "validation", "test")


def recipe_names() -> list[str]:
    """Names of the recipes packaged with distributed_ft."""
    folder = resources.files("distributed_ft.config") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_source(source: str) -> tuple[dict[str, Any], str]:
    """Return the raw mapping of a recipe name or YAML path, and a short name for the job."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {source!r} does not exist")
        text, name = path.read_text(encoding="utf-8"), path.stem
    elif source in recipe_names():
        text = (resources.files("distributed_ft.config") / "recipes" / f"{source}.yaml").read_text()
        name = source
    else:
        close = difflib.get_close_matches(source, recipe_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{source!r} is neither a YAML file nor a packaged recipe; {hint}"
            f"recipes: {', '.join(recipe_names())}"
        )
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(source, exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw, name


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: not valid YAML (...)``, one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    detail = f"{problem} ({' '.join(str(context).split())})" if context else problem
    return f"{where}: not valid YAML: {detail}; check the indentation, the ':' after each key and the quotes"


def _valid_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config may set (the ``data`` keys of all tasks)."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if prefix == "" and name == "data":
            keys.extend(
                dict.fromkeys(f"data.{key}" for s in DATA_SECTIONS.values() for key in s.model_fields)
            )
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


TRAINER_NAMES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "warmup_steps": "train.warmup_ratio",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_checkpoints",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "max_seq_length": "data.max_length",
    "model_name_or_path": "model.name",
    "metric_for_best_model": "eval.metric",
    "lora_r": "peft.r",
    "lora_alpha": "peft.alpha",
    "lora_dropout": "peft.dropout",
    "output_dir": "run.output_dir",
}
"""Hugging Face ``TrainingArguments`` / PEFT names a user may bring along, and this config's key."""


def _closest_key(key: str) -> str:
    known = TRAINER_NAMES.get(key.rsplit(".", 1)[-1])
    if known is not None and known != key:
        return f"; did you mean {known!r}?"
    keys = _valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # compare the last component only: 'train.learning_rate' -> 'train.lr'
        section = key.rsplit(".", 1)[0]
        close = difflib.get_close_matches(key, [k for k in keys if k.startswith(section)], n=1, cutoff=0)
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_override(raw: dict[str, Any], assignment: str) -> str:
    """Apply one ``a.b.c=value`` override to the raw mapping (value parsed as YAML); returns the key."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key=value (e.g. train.lr=3e-5)")
    try:
        return set_key(raw, key, yaml.safe_load(value) if value.strip() else None)
    except ConfigError as exc:
        raise ConfigError(f"override {assignment!r}: {exc}") from None


def set_key(raw: dict[str, Any], key: str, value: Any) -> str:
    """Set the dotted ``key`` of the raw mapping to ``value`` (sections made as needed); returns the key."""
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def unknown_key_hint(key: str) -> str | None:
    """``None`` for a key a config may set, else the ``; did you mean ...?`` hint (possibly empty)."""
    return None if key in _valid_keys() else _closest_key(key)


_TOKEN_CLASSIFICATION_MODEL_KEYS = ("crf", "crf_constraints")
"""``model`` keys only token classification has: a new ``task`` drops the recipe's values."""


def _as_unit(raw: dict[str, Any], source: dict[str, Any], given: set[str]) -> list[str]:
    """Drop what of the source belongs with a part the overrides replaced; the notes saying what went.

    A new ``data.train`` is a new data set: the source's other splits the overrides do not set are dropped.
    A new ``task`` also drops the source's splits, its ``data`` keys of the old task, its ``model.crf*``
    (only token classification has a CRF) and its ``eval.metric`` (unless set): they belong to the source's
    task (the metric becomes the new task's default).
    """
    notes = []
    data, source_data = raw.get("data") or {}, source.get("data") or {}
    source_task = source.get("task", JobConfig.model_fields["task"].default)
    new_task = "task" in given and raw.get("task") != source_task
    if new_task:
        reason = f"task={raw.get('task')} replaces the recipe's {source_task}"
        splits = SPLITS
    elif "data.train" in given and data.get("train") != source_data.get("train"):
        reason, splits = "data.train is overridden", SPLITS[1:]
    else:
        return notes
    dropped = [
        f"data.{split}={source_data[split]}"
        for split in splits
        if f"data.{split}" not in given and source_data.get(split) is not None
    ]
    for split in splits:
        if f"data.{split}" not in given:
            data.pop(split, None)
    if new_task:
        for key in [
            k
            for k in data
            if not _overridden(f"data.{k}", given) and key_owners(k) and raw.get("task") not in key_owners(k)
        ]:
            dropped.append(f"data.{key}={data.pop(key)}")
        model = raw.get("model") or {}
        for key in [k for k in _TOKEN_CLASSIFICATION_MODEL_KEYS if k in model and f"model.{k}" not in given]:
            if raw.get("task") != "token_classification":
                dropped.append(f"model.{key}={model.pop(key)}")
    source_metric = (source.get("eval") or {}).get("metric")
    if new_task and "eval.metric" not in given and source_metric is not None:
        raw["eval"].pop("metric", None)
        dropped.append(f"eval.metric={source_metric}")
    if dropped:
        verb = "is" if len(dropped) == 1 else "are"
        notes.append(f"{reason}, so the recipe's {' '.join(dropped)} {verb} dropped (set a key to keep it)")
    return notes


def _overridden(key: str, given: set[str]) -> bool:
    """Whether an override set ``key`` or a key inside it (``data.augment.multiplier``: ``data.augment``)."""
    return key in given or any(g.startswith(key + ".") for g in given)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {key!r}{_closest_key(key)}"
    if not key or err["type"] == "value_error":  # a validator's own message names its keys
        return err["msg"].removeprefix("Value error, ")
    shown = f" (got {err['input']!r})" if not isinstance(err["input"], dict) else ""
    return f"config key {key!r}: {err['msg']}{shown}"


def validate(raw: dict[str, Any]) -> JobConfig:
    """Validate a raw mapping into a :class:`JobConfig`, raising a one-line :class:`ConfigError`."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def load_config(
    source: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[JobConfig, str]:
    """Resolve ``source`` (recipe name, YAML path, or the default recipe) and ``overrides``.

    Returns:
        The validated config and a short job name (recipe name or file stem).
    """
    raw, name = _read_source(source or DEFAULT_RECIPE)
    original = copy.deepcopy(raw)
    given = {apply_override(raw, assignment) for assignment in overrides}
    notes = _as_unit(raw, original, given)
    config = validate(raw)
    for note in notes:
        log.warning("%s", note)
    return config, name


def dump_config(config: JobConfig) -> str:
    """The resolved config as YAML, every key shown."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
