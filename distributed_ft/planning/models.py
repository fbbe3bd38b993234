"""Model shapes for the planner: parameter counts per module group and the weight matrices LoRA can target.

A shape is built from a transformers config by instantiating the task model on the ``meta`` device (exact
counts, no memory), from a local directory holding only ``config.json``, or from explicit dimensions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distributed_ft.config.model_source import missing_model_dir
from distributed_ft.errors import ConfigError

# Fallback shapes for the packaged ``builtin:`` models (published config values), so planning needs no files.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "minilm-l6": {
        "model_type": "bert",
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}

_TASK_AUTO_CLASS = {
    "token_classification": "AutoModelForTokenClassification",
    "sequence_classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
}


@dataclass(frozen=True)
class ModuleSpec:
    """One weight matrix module (``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``)."""

    name: str
    in_features: int
    out_features: int
    kind: str = "linear"


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and the dimensions the memory and FLOPs formulas need.

    ``total_params`` counts each tensor once (tied weights once), like ``sum(p.numel() for p in
    model.parameters())``. ``matmul_params`` counts the weights of every matrix multiply a token goes
    through, including a tied output head, and drives the FLOPs estimate.
    """

    name: str
    model_type: str
    total_params: int
    embedding_params: int
    layer_params: int
    head_params: int
    other_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    output_size: int
    matmul_params: int
    gated_mlp: bool = False
    num_kv_heads: int = 0
    norm: str = "layernorm"
    hidden_dropout: bool = True
    attention_dropout: bool = True
    act_saved: int = 1
    modules: tuple[ModuleSpec, ...] = field(default=(), repr=False)
    tensor_sizes: tuple[int, ...] = field(default=(), repr=False)

    def params_below(self, threshold: int) -> int:
        """Parameters in tensors of fewer than ``threshold`` elements (DeepSpeed keeps these whole)."""
        return sum(n for n in self.tensor_sizes if n < threshold)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (fewer than ``num_heads`` with grouped-query attention)."""
        return self.num_kv_heads or self.num_heads

    @property
    def params_per_layer(self) -> int:
        """Parameters of one transformer block."""
        return self.layer_params // max(self.num_layers, 1)

    def to_json(self) -> dict[str, Any]:
        """Plain-dict summary (without the module list)."""
        return {
            "name": self.name,
            "model_type": self.model_type,
            "total_params": self.total_params,
            "embedding_params": self.embedding_params,
            "layer_params": self.layer_params,
            "head_params": self.head_params,
            "other_params": self.other_params,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "output_size": self.output_size,
            "matmul_params": self.matmul_params,
            "gated_mlp": self.gated_mlp,
            "num_kv_heads": self.kv_heads,
            "norm": self.norm,
            "hidden_dropout": self.hidden_dropout,
            "attention_dropout": self.attention_dropout,
            "act_saved": self.act_saved,
        }


def _first_attr(cfg: Any, names: Sequence[str], default: int | None = None) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def load_model_config(source: str, *, revision: str | None = None) -> Any:
    """Load a transformers config from a hub id, a local directory (``config.json`` suffices) or a builtin.

    Raises:
        ConfigError: when the config cannot be found or read.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if source.startswith("builtin:"):
        key = source.split(":", 1)[1]
        if key not in BUILTIN_CONFIGS:
            raise ConfigError(
                f"the planner has no shape for {source!r}; pass a local model directory instead "
                f"(known builtins: {', '.join(sorted(BUILTIN_CONFIGS))})"
            )
        values = dict(BUILTIN_CONFIGS[key])
        return CONFIG_MAPPING[values.pop("model_type")](**values)
    missing = missing_model_dir(source)
    if missing is not None:
        raise ConfigError(missing)
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read a model config from {source!r} ({exc}); give a directory with config.json "
            "or a hub id that is cached locally"
        ) from exc


def shape_from_config(
    cfg: Any, task: str = "token_classification", *, num_labels: int | None = None, name: str | None = None
) -> ModelShape:
    """Count parameters exactly by building the task model from ``cfg`` on the meta device.

    Args:
        cfg: A ``transformers.PretrainedConfig``.
        task: ``token_classification``, ``sequence_classification`` or ``causal_lm``.
        num_labels: Classification labels (default: ``cfg.num_labels``).
        name: Name to report (default: ``cfg.name_or_path`` or the model type).
    """
    import torch
    import transformers

    if task not in _TASK_AUTO_CLASS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(_TASK_AUTO_CLASS)}")
    cfg = copy.deepcopy(cfg)
    if num_labels is not None and task != "causal_lm":
        cfg.num_labels = num_labels
    auto_cls = getattr(transformers, _TASK_AUTO_CLASS[task])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # building a head-only model is expected to warn
    try:
        with torch.device("meta"):
            model = auto_cls.from_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"model type {cfg.model_type!r} has no {task} head in transformers: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    return _shape_from_module(model, cfg, task, name or getattr(cfg, "name_or_path", "") or cfg.model_type)


def shape_from_pretrained(
    source: str,
    task: str = "token_classification",
    *,
    num_labels: int | None = None,
    revision: str | None = None,
) -> ModelShape:
    """Load the config of ``source`` (see :func:`load_model_config`) and count its parameters."""
    cfg = load_model_config(source, revision=revision)
    return shape_from_config(cfg, task, num_labels=num_labels, name=source)


def _shape_from_module(model: Any, cfg: Any, task: str, name: str) -> ModelShape:
    from torch import nn

    hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model", "dim"), 0) or 0
    layers = _first_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"), 0) or 0
    heads = _first_attr(cfg, ("num_attention_heads", "n_head", "num_heads", "n_heads"), 1) or 1
    inter = _first_attr(cfg, ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim"), 4 * hidden)
    vocab = _first_attr(cfg, ("vocab_size",), 0) or 0

    owner = {id(p): n for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_base = bool(prefix) and hasattr(model, prefix)

    embedding_ids: set[int] = set()
    modules: list[ModuleSpec] = []
    matmul = 0
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
            modules.append(ModuleSpec(mod_name, module.num_embeddings, module.embedding_dim, "embedding"))
        elif isinstance(module, nn.Linear):
            modules.append(ModuleSpec(mod_name, module.in_features, module.out_features))
            matmul += module.in_features * module.out_features
        elif type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
            n_in, n_out = weight.shape
            modules.append(ModuleSpec(mod_name, int(n_in), int(n_out), "conv1d"))
            matmul += int(n_in) * int(n_out)

    stack = _layer_stack(model, layers)
    layer_ids = {id(p) for p in stack.parameters()} if stack is not None else set()
    if stack is not None:
        layers = len(stack)
    embedding = layer = head = other = 0
    for p in model.parameters():
        pname = owner[id(p)]
        if id(p) in embedding_ids:
            embedding += p.numel()
        elif id(p) in layer_ids:
            layer += p.numel()
        elif has_base and not pname.startswith(prefix + "."):
            head += p.numel()
        else:
            other += p.numel()

    names = " ".join(m.name for m in modules)
    gated = "gate_proj" in names or "gate_up_proj" in names or ".w3" in names
    rms = any("RMSNorm" in type(m).__name__ for m in model.modules())
    num_labels = int(getattr(cfg, "num_labels", 2))
    return ModelShape(
        name=name,
        model_type=str(getattr(cfg, "model_type", "")),
        total_params=total,
        embedding_params=embedding,
        layer_params=layer,
        head_params=head,
        other_params=other,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=int(inter or 4 * hidden),
        vocab_size=vocab,
        output_size=vocab if task == "causal_lm" else num_labels,
        matmul_params=matmul,
        gated_mlp=gated,
        num_kv_heads=_first_attr(cfg, ("num_key_value_heads", "num_kv_heads", "n_head_kv"), heads) or heads,
        norm="rmsnorm" if rms else "layernorm",
        hidden_dropout=_has_dropout(cfg, _HIDDEN_DROPOUT),
        attention_dropout=_has_dropout(cfg, _ATTENTION_DROPOUT),
        act_saved=_ACT_SAVED.get(str(getattr(cfg, "hidden_act", getattr(cfg, "activation_function", ""))), 1),
        modules=tuple(modules),
        tensor_sizes=tuple(sorted(p.numel() for p in model.parameters())),
    )


_HIDDEN_DROPOUT = ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout", "dropout", "residual_dropout")
_ATTENTION_DROPOUT = (
    "attention_probs_dropout_prob",
    "attn_pdrop",
    "attention_dropout",
    "attention_probs_dropout",
)


# Width-I tensors an activation saves for backward: fused kernels keep their input, the tanh-formula GELUs
# (written out in Python) keep four intermediates, quick-GELU (x * sigmoid(1.702 x)) two.
_ACT_SAVED = {"gelu_new": 4, "gelu_fast": 4, "gelu_python": 4, "quick_gelu": 2}


def _has_dropout(cfg: Any, names: Sequence[str]) -> bool:
    values = [getattr(cfg, n, None) for n in names]
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def _layer_stack(model: Any, num_layers: int) -> Any:
    """The ``nn.ModuleList`` of transformer blocks: the largest, preferably with ``num_layers`` items."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    matching = [m for m in lists if len(m) == num_layers] or lists
    return max(matching, key=lambda m: sum(p.numel() for p in m.parameters()))


def shape_from_dims(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    vocab_size: int,
    intermediate_size: int | None = None,
    gated_mlp: bool = False,
    num_kv_heads: int | None = None,
    norm: str = "layernorm",
    dropout: bool = False,
    task: str = "causal_lm",
    num_labels: int = 2,
    tied_embeddings: bool = False,
    total_params: int | None = None,
    name: str = "custom",
) -> ModelShape:
    """A decoder-style shape from explicit dimensions (llama naming: ``q_proj`` ... ``down_proj``).

    Biases and norms are ignored; ``total_params`` overrides the computed total when given.
    """
    h, inter = hidden_size, intermediate_size or 4 * hidden_size
    kv = h * (num_kv_heads or num_heads) // num_heads
    mlp = [("up_proj", h, inter), ("down_proj", inter, h)]
    if gated_mlp:
        mlp.insert(0, ("gate_proj", h, inter))
    block = [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h), *mlp]
    modules = [ModuleSpec("embed_tokens", vocab_size, h, "embedding")]
    for i in range(num_layers):
        modules += [ModuleSpec(f"layers.{i}.{n}", a, b) for n, a, b in block]
    per_layer = sum(a * b for _, a, b in block)
    if task == "causal_lm":
        out, head = vocab_size, 0 if tied_embeddings else vocab_size * h
        modules.append(ModuleSpec("lm_head", h, vocab_size))
    else:
        out, head = num_labels, num_labels * h
        modules.append(ModuleSpec("classifier", h, num_labels))
    computed = vocab_size * h + num_layers * per_layer + head
    return ModelShape(
        name=name,
        model_type="custom",
        total_params=total_params or computed,
        embedding_params=vocab_size * h,
        layer_params=num_layers * per_layer,
        head_params=head,
        other_params=max((total_params or computed) - computed, 0),
        num_layers=num_layers,
        hidden_size=h,
        num_heads=num_heads,
        intermediate_size=inter,
        vocab_size=vocab_size,
        output_size=out,
        matmul_params=num_layers * per_layer + h * out,
        gated_mlp=gated_mlp,
        num_kv_heads=num_kv_heads or num_heads,
        norm=norm,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        modules=tuple(modules),
        tensor_sizes=tuple(
            sorted([m.in_features * m.out_features for m in modules] + [h] * (2 * num_layers))
        ),
    )
