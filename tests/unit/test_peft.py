"""PEFT methods on tiny models built here: trainable counts by hand, a few training steps, exact reload.

The tiny BERT of ``conftest.py`` has hidden size H=64, intermediate size FFN=128, 2 layers; the tiny Llama
hidden 64, 4 query heads and 2 key/value heads of 16 (K=32 wide), 2 layers. Every expected count below is
written out from those shapes, never asked from peft.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from distributed_ft.config.load import validate
from distributed_ft.errors import CheckpointError, ConfigError
from distributed_ft.modeling import peft as dft_peft
from distributed_ft.modeling.build import build_model, load_trained

H, FFN, LAYERS = 64, 128, 2
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]
N = len(LABELS)
HEAD = H * N + N  # token classifier: weight + bias
BERT_LAYER = 4 * (H * H + H) + 2 * H + (H * FFN + FFN) + (FFN * H + H) + 2 * H  # attention, LN, FFN, LN
LLAMA_KV = 2 * 16


def _config(model_dir, task="token_classification", **peft):
    raw = {"task": task, "model": {"name": str(model_dir)}, "peft": peft}
    if task == "causal_lm":
        raw["data"] = {"packing": False}
    return validate(raw)


def _bert(tiny_bert, **peft):
    config = _config(tiny_bert, **peft)
    torch.manual_seed(0)
    model = build_model("token_classification", config.model, LABELS)
    return dft_peft.apply_peft(model, config), config


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


EXPECTED_BERT = {
    "lora": ({"method": "lora"}, LAYERS * 2 * 8 * (H + H) + HEAD),  # A: r x H, B: H x r on query, value
    "dora": ({"method": "lora", "use_dora": True}, LAYERS * 2 * (8 * 2 * H + H) + HEAD),  # + magnitude
    "rslora": ({"method": "lora", "use_rslora": True, "r": 4}, LAYERS * 2 * 4 * (H + H) + HEAD),
    "ia3": ({"method": "ia3"}, LAYERS * (H + H + FFN) + HEAD),  # key, value outputs; FFN-out input
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 4}, 4 * H + HEAD),
    "freeze": ({"method": "freeze"}, HEAD),
    "freeze_top1": ({"method": "freeze", "train_top_k_layers": 1}, BERT_LAYER + HEAD),
    "lora_all_attention": (
        {"method": "lora", "target_modules": ["query", "key", "value", "attention.output.dense"], "r": 2},
        LAYERS * 4 * 2 * (H + H) + HEAD,
    ),
}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 40, (8, 12), generator=generator)
    labels = (input_ids % N).contiguous()  # learnable: the label is a function of the token
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _train_steps(model, batch, steps=8, lr=5e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("case", list(EXPECTED_BERT))
def test_each_method_trains_and_counts_trainable_parameters_by_hand(tiny_bert, case, tmp_path):
    options, expected = EXPECTED_BERT[case]
    model, _ = _bert(tiny_bert, **options)
    assert _trainable(model) == expected
    report = dft_peft.parameter_report(model, options["method"], "token_classification")
    assert report["trainable"] == expected
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert sum(row["trainable"] for row in report["by_module_type"].values()) == expected
    assert report["by_module_type"]["head"]["trainable"] == HEAD  # the head always trains

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = _batch()
    losses = _train_steps(model, batch, lr=5e-3 if case == "freeze_top1" else 2e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    # the export reloads complete (adapter + head) and predicts exactly what the live model predicts
    model.eval()
    with torch.no_grad():
        live = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path)
    dft_peft.write_export_extras(model, tmp_path)
    reloaded = load_trained("token_classification", str(tmp_path))
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert again.shape == (8, 12, N)
    assert torch.equal(again, live)


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_bert):
    model, _ = _bert(tiny_bert, method="lora", use_rslora=True, r=4, alpha=16)
    query = model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert query.scaling["default"] == pytest.approx(16 / math.sqrt(4))


def test_prefix_tuning_on_an_encoder_is_refused_clearly(tiny_bert):
    with pytest.raises(ConfigError, match="prefix_tuning needs a model whose forward takes past_key_values"):
        _bert(tiny_bert, method="prefix_tuning")


def _llama(tiny_llama, task="causal_lm", **peft):
    config = _config(tiny_llama, task=task, **peft)
    torch.manual_seed(0)
    labels = None if task == "causal_lm" else ["neg", "pos"]
    model = build_model(task, config.model, labels)
    return dft_peft.apply_peft(model, config)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"method": "lora"}, LAYERS * (8 * (H + H) + 8 * (H + LLAMA_KV))),  # q_proj H->H, v_proj H->K
        ({"method": "ia3"}, LAYERS * (LLAMA_KV + LLAMA_KV + FFN)),  # k_proj, v_proj outputs; down_proj input
        ({"method": "prefix_tuning", "num_virtual_tokens": 4}, 4 * LAYERS * 2 * LLAMA_KV),  # keys + values
        ({"method": "prompt_tuning", "num_virtual_tokens": 4}, 4 * H),
    ],
)
def test_decoder_methods_train_and_count_by_hand(tiny_llama, options, expected):
    model = _llama(tiny_llama, **options)
    assert _trainable(model) == expected
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = _train_steps(model, batch, steps=6, lr=3e-2)
    assert losses[-1] < losses[0], losses


def test_sequence_classification_head_on_llama_is_score(tiny_llama):
    model = _llama(tiny_llama, task="sequence_classification", method="lora", r=2)
    head = H * 2  # score: H -> 2 labels, no bias
    assert _trainable(model) == LAYERS * (2 * (H + H) + 2 * (H + LLAMA_KV)) + head


def test_prompt_methods_refuse_packed_causal_lm_rows(tiny_llama):
    config = validate(
        {"task": "causal_lm", "model": {"name": str(tiny_llama)}, "peft": {"method": "prompt_tuning"}}
    )
    model = build_model("causal_lm", config.model)
    with pytest.raises(ConfigError, match=r"data\.packing=false"):
        dft_peft.apply_peft(model, config)


def test_unknown_target_module_names_the_available_ones(tiny_bert):
    with pytest.raises(ConfigError) as info:
        _bert(tiny_bert, method="lora", target_modules=["query", "q_proj"])
    message = str(info.value)
    assert "'q_proj' match no module of BertForTokenClassification" in message
    for name in ("query", "key", "value", "dense", "classifier"):
        assert name in message
    with pytest.raises(ConfigError, match=r"peft\.modules_to_save: 'pooler'"):
        _bert(tiny_bert, method="lora", modules_to_save=["pooler"])


def test_method_switches_are_checked_in_the_config(tiny_bert):
    with pytest.raises(ConfigError, match="use_dora"):
        from distributed_ft.config.load import load_config

        load_config("ner-conll2003", ["peft.method=ia3", "peft.use_dora=true"])
    with pytest.raises(ConfigError, match="train_top_k_layers"):
        load_config("ner-conll2003", ["peft.method=lora", "peft.train_top_k_layers=2"])
    with pytest.raises(ConfigError, match="has 2 layers"):
        _bert(tiny_bert, method="freeze", train_top_k_layers=3)


def test_one_target_table_serves_the_adapters_and_the_planner(tiny_bert, monkeypatch):
    """``modeling/targets.py`` is the only table: a change there reaches PEFT and the planner alike."""
    from transformers import AutoModel

    from distributed_ft.modeling import targets
    from distributed_ft.planning import lora_target_modules, shape_from_config

    monkeypatch.setitem(targets.LORA_TARGETS, "bert", ("key",))
    model = AutoModel.from_pretrained(tiny_bert)
    assert dft_peft.default_targets(model, "lora") == (["key"], None)
    planned = lora_target_modules(shape_from_config(model.config), None)
    assert planned and {m.name.rsplit(".", 1)[-1] for m in planned} == {"key"}


def test_checkpoint_state_is_adapter_only_and_reloads(tiny_bert):
    model, _ = _bert(tiny_bert, method="lora")
    _train_steps(model, _batch(), steps=2)
    state = dft_peft.trainable_state_dict(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in state.values()) == EXPECTED_BERT["lora"][1]
    fresh, _ = _bert(tiny_bert, method="lora")
    dft_peft.load_trainable_state_dict(fresh, state)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())
    other, _ = _bert(tiny_bert, method="lora", target_modules=["key"])
    with pytest.raises(CheckpointError, match="other peft"):
        dft_peft.load_trainable_state_dict(other, state)
    full, _ = _bert(tiny_bert)  # nothing frozen: the whole state_dict, loaded strictly
    assert dft_peft.trainable_state_dict(full).keys() == full.state_dict().keys()


def test_adapter_export_loads_with_plain_peft_and_merges(tiny_bert, tmp_path):
    from peft import AutoPeftModelForTokenClassification, PeftModel
    from transformers import AutoModelForTokenClassification

    model, _ = _bert(tiny_bert, method="lora")
    batch = _batch()
    _train_steps(model, batch, steps=3)
    model.eval()
    with torch.no_grad():
        live = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path / "adapter")
    dft_peft.write_export_extras(model, tmp_path / "adapter")
    kwargs = json.loads((tmp_path / "adapter" / dft_peft.BASE_KWARGS_FILE).read_text())
    kwargs["id2label"] = {int(i): label for i, label in kwargs["id2label"].items()}

    plain = AutoPeftModelForTokenClassification.from_pretrained(tmp_path / "adapter", **kwargs).eval()
    base = AutoModelForTokenClassification.from_pretrained(tiny_bert, **kwargs)
    manual = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged_model = dft_peft.merge_adapter(load_trained("token_classification", str(tmp_path / "adapter")))
    merged_model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label[1] == "B-PER"
    with torch.no_grad():
        assert torch.equal(plain(input_ids=batch["input_ids"]).logits, live)
        assert torch.equal(manual(input_ids=batch["input_ids"]).logits, live)
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, live, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_cannot_be_merged(tiny_bert, tmp_path):
    model, _ = _bert(tiny_bert, method="prompt_tuning", num_virtual_tokens=2)
    with pytest.raises(ConfigError, match="cannot be merged"):
        dft_peft.merge_adapter(model)
