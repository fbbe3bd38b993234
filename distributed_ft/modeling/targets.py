"""Default PEFT target modules per ``config.model_type``: one table for the adapters and the planner.

``modeling/peft.py`` wraps these modules when ``peft.target_modules`` is not set (PEFT's own mapping
covers the model types missing here); ``planning/lora.py`` counts the parameters their adapters add.
Plain data: nothing is imported, so the planner stays torch-free.
"""

from __future__ import annotations

_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "olmo")

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: ("query", "value") for t in _BERT_LIKE},
    **{t: ("q_proj", "v_proj") for t in _LLAMA_LIKE},
    "distilbert": ("q_lin", "v_lin"),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "mpnet": ("q", "v"),
    "t5": ("q", "v"),
    "opt": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
}
"""Default LoRA ``target_modules`` (PEFT's defaults: the attention query and value projections)."""

IA3_TARGETS: dict[str, tuple[list[str] | str, list[str] | str]] = {
    # keys, values and the input of the second feed-forward layer (the IA3 paper's l_k, l_v, l_ff)
    **{
        t: (r".*\.(self\.key|self\.value|layer\.\d+\.output\.dense)", r".*\.layer\.\d+\.output\.dense")
        for t in _BERT_LIKE
    },
    **{t: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for t in _LLAMA_LIKE},
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "mpnet": (["k", "v", "output.dense"], ["output.dense"]),
}
"""Default IA3 ``(target_modules, feedforward_modules)``."""
