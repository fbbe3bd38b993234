"""Parameter-efficient fine-tuning: the only module that imports ``peft`` (lazily, inside functions).

``peft.method`` picks how a task model is trained (see ``modeling/PEFT.md``):

* ``lora`` (with ``use_dora`` / ``use_rslora``), ``ia3``, ``prompt_tuning``, ``prefix_tuning``: PEFT
  adapters; the base weights are frozen and the task head is trained in full (``modules_to_save``),
  so a classification adapter reloads complete.
* ``freeze``: no adapter; only the head and the top ``train_top_k_layers`` layers train.

Everything else the rest of the library needs about adapters lives here too: the trainable-parameter
report, adapter-only checkpoint state, adapter export extras, reloading an adapter export onto its base
model, and merging LoRA/IA3 into the base weights.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_ft.config.schema import JobConfig
from distributed_ft.errors import CheckpointError, ConfigError
from distributed_ft.modeling.crf import CONFIG_KEY as CRF_CONFIG_KEY
from distributed_ft.modeling.gazetteer import CONFIG_KEY as GAZETTEER_CONFIG_KEY
from distributed_ft.modeling.targets import IA3_TARGETS, LORA_TARGETS

log = logging.getLogger("distributed_ft")

TASK_TYPES = {
    "token_classification": "TOKEN_CLS",
    "sequence_classification": "SEQ_CLS",
    "causal_lm": "CAUSAL_LM",
}
"""Our task names -> PEFT ``task_type``."""
ADAPTER_CONFIG = "adapter_config.json"
BASE_KWARGS_FILE = "base_model_kwargs.json"
"""Written next to an adapter export: the keyword arguments that give the base model its task head
(label maps, problem type), for ``AutoPeftModelFor*.from_pretrained(export, **kwargs)``."""
MERGEABLE = ("lora", "ia3")
IGNORE = -100


# --------------------------------------------------------------------------- model anatomy
def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Names of the task head: top-level children with parameters other than the backbone.

    A causal LM has none (its LM head is the output embedding, usually tied to the input one).
    """
    if task == "causal_lm":
        return []
    backbone = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != backbone and next(child.parameters(), None) is not None
    ]


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer layers: the first ``ModuleList`` as long as ``config.num_hidden_layers``."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for name, stack in lists:
        if len(stack) == count:
            return name, stack
    if not lists:
        raise ConfigError(f"peft.method=freeze: {type(model).__name__} has no list of layers")
    return max(lists, key=lambda item: len(item[1]))


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Short names of the leaf modules with a weight matrix (what ``target_modules`` may name)."""
    names = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_leaf = not any(True for _ in module.children())
        # a ZeRO-3 partition is a 1-D placeholder; ``ds_shape`` keeps the whole weight's shape
        ndim = len(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
        if name and is_leaf and isinstance(weight, torch.Tensor) and ndim >= 2:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's matching rule: a regex string must match the whole path; a list entry its dotted end."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(model: nn.Module, targets: list[str] | str, key: str = "peft.target_modules") -> None:
    """Raise a :class:`ConfigError` naming the available modules when a target matches nothing."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        missing = [] if any(_matches(n, targets) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(_matches(n, [t]) for n in names)]
    if missing:
        raise ConfigError(
            f"{key}: {', '.join(map(repr, missing))} match no module of {type(model).__name__}; modules "
            f"that can be adapted: {', '.join(adaptable_module_names(model))} (a name matches a module "
            "whose dotted path ends with it, e.g. attention.output.dense)"
        )


def default_targets(model: nn.Module, method: str) -> tuple[list[str] | str, list[str] | str | None]:
    """``(target_modules, feedforward_modules)`` for ``method`` on this architecture."""
    from peft.utils import constants

    kind = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if method == "lora":
        targets = LORA_TARGETS.get(kind) or constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
            kind
        )
        feedforward = None
    else:
        targets, feedforward = IA3_TARGETS.get(kind, (None, None))
        if targets is None:
            targets = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(kind)
            feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(kind)
    if not targets:
        raise ConfigError(
            f"no default peft.target_modules for model type {kind!r}; set peft.target_modules to some of: "
            f"{', '.join(adaptable_module_names(model))}"
        )
    return list(targets) if isinstance(targets, list | tuple) else targets, feedforward


# --------------------------------------------------------------------------- applying a method
def apply_peft(model: nn.Module, config: JobConfig) -> nn.Module:
    """Wrap (or freeze) a freshly built task model as ``config.peft`` asks; ``none`` returns it as is."""
    cfg = config.peft
    if cfg.method == "none":
        return model
    heads = head_modules(model, config.task)
    extra = list(cfg.modules_to_save or [])
    if extra:
        check_targets(model, extra, "peft.modules_to_save")
    if _vocab_was_resized(model):  # new token rows are trained and saved, or a reload would lose them
        embedding = model.get_input_embeddings()
        extra.append(next(name for name, module in model.named_modules() if module is embedding))
    if config.model.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    if cfg.method == "freeze":
        return freeze_layers(model, cfg.train_top_k_layers, heads + extra)
    if cfg.method in ("prompt_tuning", "prefix_tuning"):
        _check_prompt_learning(model, config)
    import peft

    peft_config = _peft_config(model, config, heads + extra)
    wrapped = peft.get_peft_model(model, peft_config)
    if cfg.method == "prompt_tuning" and config.task == "token_classification":
        align_virtual_tokens(wrapped, cfg.num_virtual_tokens)
    log.info("peft: %s; trained in full: %s", describe(peft_config), ", ".join(heads + extra) or "nothing")
    return wrapped


def _peft_config(model: nn.Module, config: JobConfig, modules_to_save: list[str]) -> Any:
    import peft

    cfg = config.peft
    common: dict[str, Any] = {
        "task_type": TASK_TYPES[config.task],
        "modules_to_save": modules_to_save or None,
    }
    if cfg.method in ("lora", "ia3"):
        targets: list[str] | str | None = cfg.target_modules
        feedforward = cfg.feedforward_modules
        if targets is None:
            targets, default_ff = default_targets(model, cfg.method)
            feedforward = default_ff if feedforward is None else feedforward
        check_targets(model, targets)
        if cfg.method == "lora":
            return peft.LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=targets,
                use_dora=cfg.use_dora,
                use_rslora=cfg.use_rslora,
                **common,
            )
        feedforward = feedforward or []
        if feedforward:
            check_targets(model, feedforward, "peft.feedforward_modules")
        if (
            isinstance(targets, list)
            and isinstance(feedforward, list)
            and not set(feedforward) <= set(targets)
        ):
            raise ConfigError("peft.feedforward_modules must be a subset of peft.target_modules")
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    if cfg.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)


def describe(peft_config: Any) -> str:
    """One line about a PEFT config, for the log."""
    kind = str(getattr(peft_config, "peft_type", "")).split(".")[-1].lower()
    targets = getattr(peft_config, "target_modules", None)
    parts = [kind]
    if kind == "lora":
        parts.append(f"r={peft_config.r} alpha={peft_config.lora_alpha}")
        parts += [s for s, on in (("dora", peft_config.use_dora), ("rslora", peft_config.use_rslora)) if on]
    if targets is not None:
        parts.append(f"on {targets if isinstance(targets, str) else ', '.join(sorted(targets))}")
    if hasattr(peft_config, "num_virtual_tokens") and kind.endswith("tuning"):
        parts.append(f"{peft_config.num_virtual_tokens} virtual tokens")
    return " ".join(parts)


def _check_prompt_learning(model: nn.Module, config: JobConfig) -> None:
    """Refuse the prompt-learning combinations this stack cannot train correctly."""
    method = config.peft.method
    if config.task == "causal_lm" and config.data.packing:
        raise ConfigError(
            f"peft.method={method} adds virtual tokens, which packed rows (restarting positions) cannot "
            "take; set data.packing=false"
        )
    if method == "prefix_tuning" and config.task != "causal_lm":
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
        if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
            raise ConfigError(
                f"peft.method=prefix_tuning needs a model whose forward takes past_key_values; "
                f"{type(model).__name__} (this transformers version) does not, so PEFT cannot feed it the "
                "prefix. Use peft.method=prompt_tuning or lora"
            )


def align_virtual_tokens(model: nn.Module, count: int) -> None:
    """Token classification with prompt tuning: hide the ``count`` virtual positions from the task.

    PEFT prepends the virtual tokens to the input, so the model returns ``count`` extra logits in front.
    Labels are padded with ``-100`` there (no loss) and the extra logits are cut off the output, so
    logits line up with ``input_ids`` again. Hooks are not saved: :func:`load_adapter` installs them.
    """

    def pad_labels(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], count), IGNORE), labels], 1)
        return args, kwargs

    def cut_logits(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        output.logits = output.logits[:, count:]
        return output

    model.register_forward_pre_hook(pad_labels, with_kwargs=True)
    model.register_forward_hook(cut_logits, with_kwargs=True)


def freeze_layers(model: nn.Module, top_k: int, trained: list[str]) -> nn.Module:
    """Partial fine-tuning: freeze everything but the ``trained`` modules and the top ``top_k`` layers.

    With ``top_k > 0`` every parameter registered after the layers (a final norm, a pooler) trains too.
    """
    stack_name, stack = layer_stack(model)
    if top_k > len(stack):
        raise ConfigError(f"peft.train_top_k_layers={top_k} but the model has {len(stack)} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in model.named_modules():
        if name and _matches(name, trained):
            for param in module.parameters():
                param.requires_grad_(True)
    if top_k:
        top = {id(p) for layer in stack[len(stack) - top_k :] for p in layer.parameters()}
        last_layer = {id(p) for p in stack[-1].parameters()}
        above = False
        for _, param in model.named_parameters():
            if id(param) in top:
                param.requires_grad_(True)
            above = above or id(param) in last_layer
            if above and id(param) not in last_layer:
                param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "peft.method=freeze trains nothing here (no head); set peft.train_top_k_layers >= 1"
        )
    log.info(
        "peft: freeze; training %s and the top %d of %d layers (%s)",
        ", ".join(trained) or "no head",
        top_k,
        len(stack),
        stack_name,
    )
    return model


def _vocab_was_resized(model: nn.Module) -> bool:
    """Whether the input embeddings grew beyond the pretrained vocabulary (tokens were added)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source or not Path(source).is_dir() or not hasattr(model, "get_input_embeddings"):
        return False
    saved = json.loads((Path(source) / "config.json").read_text()).get("vocab_size")
    return saved is not None and model.get_input_embeddings().num_embeddings > saved


# --------------------------------------------------------------------------- parameter report
_ADAPTER_KINDS = (("lora_", "lora"), ("ia3_", "ia3"), ("prompt_encoder", "prompt"))


def _kind(name: str, owners: dict[str, str], heads: tuple[str, ...]) -> str:
    for marker, kind in _ADAPTER_KINDS:
        if marker in name:
            return kind
    if ".modules_to_save." in name or name.startswith(heads):
        return "head"
    return owners.get(name.rsplit(".", 1)[0], "other")


def parameter_report(model: nn.Module, method: str = "none", task: str = "") -> dict[str, Any]:
    """Trainable and total parameters, overall and per module type (adapter kinds, head, base layers).

    Counts every parameter once (tied weights once); ZeRO-3 partitions count at their full size.
    """
    inner = model.get_base_model() if _is_peft_model(model) else model
    heads = tuple(f"{h}." for h in head_modules(inner, task)) if not _is_peft_model(model) else ()
    owners = {name: type(module).__name__ for name, module in model.named_modules()}
    by_type: dict[str, dict[str, int]] = {}
    trainable = total = 0
    for name, param in model.named_parameters():
        count = int(getattr(param, "ds_numel", param.numel()))
        row = by_type.setdefault(_kind(name, owners, heads), {"trainable": 0, "total": 0})
        row["total"] += count
        total += count
        if param.requires_grad:
            row["trainable"] += count
            trainable += count
    return {
        "method": method,
        "trainable": trainable,
        "total": total,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "by_module_type": dict(sorted(by_type.items(), key=lambda kv: (-kv[1]["trainable"], kv[0]))),
    }


def format_parameter_report(report: dict[str, Any]) -> str:
    """The report as a few log lines."""
    lines = [
        f"parameters ({report['method']}): {report['trainable']:,} trainable of {report['total']:,} "
        f"({report['trainable_percent']:.3f}%)"
    ]
    for kind, row in report["by_module_type"].items():
        lines.append(f"  {kind:<16}{row['trainable']:>14,} trainable{row['total']:>14,} total")
    return "\n".join(lines)


# --------------------------------------------------------------------------- checkpoints
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state for a checkpoint: only trainable parameters when some are frozen.

    Frozen weights come back from the base model when the run is rebuilt, so adapter runs write
    adapter-sized checkpoints. A model with nothing frozen gets its full ``state_dict``.
    """
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    if all(p.requires_grad for p in params.values()):
        return model.state_dict()
    return {name: p.detach() for name, p in params.items() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` wrote; every trainable parameter must be in it."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    absent = [n for n in missing if n in trainable]
    if unexpected or absent:
        raise CheckpointError(
            f"checkpoint does not fit the model: unexpected {sorted(unexpected)[:5]}, missing trainable "
            f"{absent[:5]}; was it written with other peft.* settings?"
        )


# --------------------------------------------------------------------------- export and reload
def is_adapter_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a PEFT adapter export."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def adapter_task(directory: str | Path) -> str | None:
    """Our task name for an adapter export's PEFT ``task_type`` (``None`` if unknown)."""
    task_type = json.loads((Path(directory) / ADAPTER_CONFIG).read_text()).get("task_type")
    return {v: k for k, v in TASK_TYPES.items()}.get(task_type)


def write_export_extras(model: nn.Module, directory: str | Path) -> None:
    """After an adapter export: write the base model's head arguments (no-op for a full model)."""
    if not _is_peft_model(model) or not is_adapter_dir(directory):
        return
    config = model.get_base_model().config
    kwargs: dict[str, Any] = {}
    if model.peft_config["default"].task_type in ("TOKEN_CLS", "SEQ_CLS"):
        kwargs.update(num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id)
        if config.problem_type:
            kwargs["problem_type"] = config.problem_type
    if getattr(config, "pad_token_id", None) is not None:
        kwargs["pad_token_id"] = config.pad_token_id
    if getattr(config, CRF_CONFIG_KEY, None):  # the base gets the CRF the adapter trained (modules_to_save)
        kwargs[CRF_CONFIG_KEY] = getattr(config, CRF_CONFIG_KEY)
    if getattr(config, GAZETTEER_CONFIG_KEY, None):  # likewise the gazetteer embedding
        kwargs[GAZETTEER_CONFIG_KEY] = getattr(config, GAZETTEER_CONFIG_KEY)
    Path(directory, BASE_KWARGS_FILE).write_text(json.dumps(kwargs, indent=2) + "\n")


def load_adapter(directory: str | Path, load_base: Callable[..., nn.Module]) -> nn.Module:
    """An adapter export on its base model, ready for inference.

    Args:
        directory: A directory written by an adapter run's export (``adapter_config.json`` + weights).
        load_base: ``load_base(name_or_path, **kwargs)`` loads the base task model; it gets the base named
            in ``adapter_config.json`` and the head arguments of ``base_model_kwargs.json``.
    """
    import peft

    directory = Path(directory)
    base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{directory}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    kwargs_file = directory / BASE_KWARGS_FILE
    kwargs = json.loads(kwargs_file.read_text()) if kwargs_file.is_file() else {}
    if "id2label" in kwargs:  # JSON object keys are strings; transformers wants int ids here
        kwargs["id2label"] = {int(i): label for i, label in kwargs["id2label"].items()}
    try:
        model = load_base(base, **kwargs)
    except ConfigError as exc:
        raise ConfigError(
            f"adapter export {directory} needs its base model {base!r} ({ADAPTER_CONFIG}: "
            f"base_model_name_or_path), which cannot be loaded here: {exc}"
        ) from exc
    _grow_vocab(model, directory)
    model = peft.PeftModel.from_pretrained(model, str(directory))
    adapter = model.peft_config["default"]
    if str(adapter.peft_type).endswith("PROMPT_TUNING") and adapter.task_type == "TOKEN_CLS":
        align_virtual_tokens(model, adapter.num_virtual_tokens)
    return model.eval()


def _grow_vocab(model: nn.Module, directory: Path) -> None:
    """Grow the base embeddings to the exported tokenizer's size (tokens added in training)."""
    if not (directory / "tokenizer_config.json").is_file() or not hasattr(model, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(directory)))
    if size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(size)


def merge_adapter(model: nn.Module) -> nn.Module:
    """The plain transformers model with a LoRA or IA3 adapter merged into its weights.

    Raises:
        ConfigError: The adapter cannot be merged (prompt and prefix tuning add inputs, not weights).
    """
    kind = str(model.peft_config["default"].peft_type).split(".")[-1].lower()
    if kind not in MERGEABLE:
        raise ConfigError(
            f"--merge-lora: a {kind} adapter cannot be merged into the weights (only lora, ia3)"
        )
    return model.merge_and_unload()
