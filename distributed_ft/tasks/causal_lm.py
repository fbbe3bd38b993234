"""Causal-LM instruction tuning: prompt/response or chat records, loss on the responses only, packing.

Records are rendered with the tokenizer's chat template when it has one (``data.chat_template=auto``),
else with the plain template of :mod:`distributed_ft.tasks.instruction_data`. Only tokens of assistant
turns (and their end-of-turn token) carry a loss. Training examples are packed into rows of
``data.max_length`` tokens with ``position_ids`` that restart per example; a forward hook hands such
batches to the model without the 2D ``attention_mask`` (kept in the batch for token counting) and without
a KV cache, so transformers builds a block-diagonal causal mask from the positions and packed examples
never attend to each other. ``build_model`` checks that on the model itself and refuses to train packed
when the model does not support it (``data.packing=false`` then).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from distributed_ft.config.schema import JobConfig
from distributed_ft.config.task_metrics import TASK_METRICS
from distributed_ft.data import readers
from distributed_ft.data.builtin import resolve
from distributed_ft.data.prepare import (
    Preparation,
    PreparedDataset,
    SplitPlan,
    SplitStats,
    limit_split,
)
from distributed_ft.data.sources import Batch
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.modeling.build import build_model, load_tokenizer
from distributed_ft.tasks.base import cached, input_key
from distributed_ft.tasks.instruction_data import (
    IGNORE,
    Message,
    Renderer,
    nonempty_string,
    pack,
    response_labels,
    validate_messages,
)
from distributed_ft.tasks.losses import shifted, token_count, token_cross_entropy_sum

log = logging.getLogger("distributed_ft")
METRICS = TASK_METRICS["causal_lm"]
"""Metrics ``eval.metric`` may name, and whether each is maximised or minimised."""
PREDICT_FORMATS = ("text", "jsonl")
ENCODE_CHUNK = 1024


# --------------------------------------------------------------------------- packing isolation
def _isolate_packed_examples(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook: a batch with ``position_ids`` is a packed batch (only packed rows carry them).

    transformers then derives the block-diagonal causal mask from ``position_ids``, but only when the 2D
    ``attention_mask`` is ``None`` and no cache is in use, so both are dropped for such batches. Padding at
    the end of a row has positions that restart at 0, so it forms its own segment. The decision looks at
    which inputs are present, never at their values: no host-device sync per forward pass.
    """
    positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if positions is None or mask is None or mask.ndim != 2:
        return None
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    return args, {**kwargs, "attention_mask": None, "use_cache": False}


def check_packing_isolation(model: nn.Module) -> float:
    """Largest logit difference between an example run alone and packed behind another one.

    Raises:
        ConfigError: When packed examples see each other (the model builds its mask another way).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    first, second = (torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in (5, 6))
    positions = torch.cat([torch.arange(5), torch.arange(6)]).unsqueeze(0).to(device)
    packed = torch.cat([first, second], 1)
    with torch.no_grad():
        alone = model(input_ids=second).logits.float()
        together = model(input_ids=packed, attention_mask=torch.ones_like(packed), position_ids=positions)
        together = together.logits[:, 5:].float()
    model.train(was_training)
    difference = float((alone - together).abs().max())
    relative = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    tolerance = relative * max(1.0, float(alone.abs().max()))
    if difference > tolerance:
        raise ConfigError(
            f"{type(model).__name__}: packed examples attend to each other (logits differ by "
            f"{difference:.3g}); the model does not build its attention mask from restarting position_ids; "
            "set data.packing=false"
        )
    return difference


# --------------------------------------------------------------------------- encoding
def encode_chats(
    table: pa.Table, renderer: Renderer, max_length: int, *, first: int = 0
) -> tuple[pa.Table, SplitStats]:
    """Token ids and response-only labels per record, cut to ``max_length`` tokens.

    A record that keeps no response token is left out (counted in ``stats.extra``); ``example_id`` is the
    record's index in the split (``first`` is the split index of the table's first row), so ids can skip.
    """
    tokenizer = renderer.tokenizer
    chats = [json.loads(m) for m in table.column("messages").to_pylist()]
    lines = table.column("line").to_pylist()
    kept: dict[str, list] = {"example_id": [], "input_ids": [], "labels": [], "prompt_length": [], "line": []}
    truncated = dropped = 0
    for start in range(0, len(chats), ENCODE_CHUNK):
        rendered = [renderer.render(chat) for chat in chats[start : start + ENCODE_CHUNK]]
        encoding = tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=renderer.add_special_tokens,
            return_offsets_mapping=True,
        )
        for i, (_, spans) in enumerate(rendered):
            ids = encoding["input_ids"][i]
            offsets = encoding["offset_mapping"][i]
            labels = response_labels(ids, offsets, spans)
            answer = spans[-1][0]  # the last response starts here
            prompt_length = next((t for t in range(1, len(ids)) if offsets[t][1] > answer), len(ids))
            truncated += len(ids) > max_length
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):
                dropped += 1
                continue
            row = (first + start + i, ids, labels, min(prompt_length, len(ids)), lines[start + i])
            for name, value in zip(kept, row, strict=True):
                kept[name].append(value)
    stats = SplitStats(examples=len(kept["input_ids"]), tokens=sum(map(len, kept["input_ids"])))
    stats.extra = {"cut_examples": truncated, "dropped_examples": dropped}
    int_list = pa.list_(pa.int32())
    out = pa.table(
        {
            "example_id": pa.array(kept["example_id"], pa.int64()),
            "input_ids": pa.array(kept["input_ids"], int_list),
            "labels": pa.array(kept["labels"], int_list),
            "prompt_length": pa.array(kept["prompt_length"], pa.int32()),
            "length": pa.array([len(ids) for ids in kept["input_ids"]], pa.int32()),
            "line": pa.array(kept["line"], pa.int64()),
        }
    )
    return out, stats


def pack_examples(table: pa.Table, stats: SplitStats, max_length: int) -> tuple[pa.Table, SplitStats]:
    """Pack encoded examples into rows of at most ``max_length`` tokens (best fit, over the whole split).

    Each row's ``position_ids`` restart at every example; its ``line`` is that of its first example.
    """
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    lines = table.column("line").to_pylist()
    groups = pack([len(row) for row in ids], max_length)
    int_list = pa.list_(pa.int32())
    out = pa.table(
        {
            "example_id": pa.array(np.arange(len(groups)), pa.int64()),
            "input_ids": pa.array([list(chain.from_iterable(ids[i] for i in g)) for g in groups], int_list),
            "labels": pa.array([list(chain.from_iterable(labels[i] for i in g)) for g in groups], int_list),
            "position_ids": pa.array(
                [list(chain.from_iterable(range(len(ids[i])) for i in g)) for g in groups], int_list
            ),
            "length": pa.array([sum(len(ids[i]) for i in g) for g in groups], pa.int32()),
            "line": pa.array([lines[g[0]] for g in groups], pa.int64()),
        }
    )
    fill = stats.tokens / max(1, len(groups) * max_length)
    stats.extra = {**stats.extra, "packed_rows": len(groups), "fill": fill}
    return out, stats


# --------------------------------------------------------------------------- the task
class CausalLMTask:
    """Supervised fine-tuning of a decoder on instructions or chats; scored by loss and perplexity."""

    name = "causal_lm"
    metrics = METRICS

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.pad_token_id = 0
        self.tokenizer: Any = None
        self.renderer: Renderer | None = None

    # ----------------------------------------------------------------- data
    def prepare_tokenizer(self, tokenizer: Any) -> Renderer:
        """Give the tokenizer a padding token (eos) when it has none; pick the template."""
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"the tokenizer of {self.config.model.name!r} has no pad or eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id
        self.renderer = Renderer(tokenizer, self.config.data.chat_template)
        return self.renderer

    def read(self, path: str, need_response: bool = True) -> pa.Table:
        """Read one split into ``messages`` (JSON text, one chat per record), ``kind`` and ``line``."""
        data = self.config.data
        hint = (
            f"records need {data.messages_column!r} (a chat) or {data.prompt_column!r} and "
            f"{data.response_column!r}; set data.messages_column / data.prompt_column / data.response_column"
        )
        table = readers.read_records(resolve(path), data.format, None, hint=hint)
        names = table.column_names
        chats = []
        if data.messages_column in names:
            kind = "messages"
            for row, value in enumerate(table.column(data.messages_column).to_pylist()):
                where = readers.RowLocation(table, row)
                chats.append(validate_messages(value, where, data.messages_column, need_response))
        elif data.prompt_column in names and (data.response_column in names or not need_response):
            kind = "prompt"
            prompts = table.column(data.prompt_column).to_pylist()
            responses = (
                table.column(data.response_column).to_pylist() if data.response_column in names else None
            )
            for row, prompt in enumerate(prompts):
                where = readers.RowLocation(table, row)
                chat = [{"role": "user", "content": nonempty_string(prompt, where, data.prompt_column)}]
                if responses is not None and (need_response or responses[row] is not None):
                    chat.append(
                        {
                            "role": "assistant",
                            "content": nonempty_string(responses[row], where, data.response_column),
                        }
                    )
                chats.append(chat)
        else:
            raise DataError(f"{readers.row_location(table, 0)}: found columns {names}; {hint}")
        out = pa.table(
            {
                "messages": pa.array([json.dumps(c, ensure_ascii=False) for c in chats], pa.string()),
                "kind": pa.array([kind] * len(chats), pa.string()),
                "line": table.column("line"),
            }
        )
        return out.replace_schema_metadata(table.schema.metadata)

    def cache_key(self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None = None) -> str:
        """Inputs by path, size and mtime, the tokenizer, the template and the encoding options."""
        del labels  # a causal LM has none (eval.metric was checked when the config loaded)
        renderer = self.prepare_tokenizer(tokenizer)
        data = self.config.data
        return input_key(
            self.name,
            self.config,
            tokenizer,
            splits,
            None,
            template=renderer.template or "plain",
            packing=data.packing,
            reader=[data.format, data.messages_column, data.prompt_column, data.response_column],
        )

    def prepare_data(
        self,
        tokenizer: Any,
        splits: dict[str, str],
        labels: list[str] | None = None,
        key: str | None = None,
    ) -> PreparedDataset:
        """The cached encoding of the splits (the training split packed); on a miss they are read first."""
        self.prepare_tokenizer(tokenizer)
        prepared = cached(
            self.config, key or self.cache_key(tokenizer, splits, labels), lambda: self.preparation(splits)
        )
        if not prepared.reused:
            for split in prepared.splits.values():
                self._warn_cut(split.name, split.stats)
        return prepared

    def preparation(self, splits: dict[str, str]) -> Preparation:
        """Read and render every split; the training split is packed (``data.packing``) once encoded."""
        assert self.renderer is not None
        data = self.config.data
        encode = functools.partial(encode_chats, renderer=self.renderer, max_length=data.max_length)
        pack_train = functools.partial(pack_examples, max_length=data.max_length)
        plans = [
            SplitPlan(
                split,
                limit_split(self.read(path), split, data),
                encode,
                finish=pack_train if data.packing and split == "train" else None,
            )
            for split, path in splits.items()
        ]
        return Preparation(plans, labels=[])

    def encode(self, table: pa.Table, split: str, pack_rows: bool = False) -> tuple[pa.Table, SplitStats]:
        """Token ids and response-only labels per example (or per packed row)."""
        assert self.renderer is not None
        max_length = self.config.data.max_length
        encoded, stats = encode_chats(table, self.renderer, max_length)
        if pack_rows:
            encoded, stats = pack_examples(encoded, stats, max_length)
        self._warn_cut(split, stats)
        return encoded, stats

    def _warn_cut(self, split: str, stats: SplitStats) -> None:
        cut, dropped = stats.extra.get("cut_examples", 0), stats.extra.get("dropped_examples", 0)
        if cut or dropped:
            log.warning(
                "%s: %d examples longer than data.max_length=%d were cut; %d of them kept no response token "
                "and were left out",
                split,
                cut,
                self.config.data.max_length,
                dropped,
            )

    def collate(self, rows: list[dict[str, Any]], with_meta: bool = False) -> Batch:
        """Right padding; packed rows carry ``position_ids`` (padding restarts at 0: its own segment)."""
        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        positions = np.tile(np.arange(width), (len(rows), 1))
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[i, :n] = r["input_ids"]
            if "labels" in r:
                labels[i, :n] = r["labels"]
            if "position_ids" in r:
                positions[i, :n] = r["position_ids"]
                positions[i, n:] = np.arange(width - n)
        batch: Batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(
                (np.arange(width) < np.array(lengths)[:, None]).astype(np.int64)
            ),
        }
        if "labels" in rows[0]:
            batch["labels"] = torch.from_numpy(labels)
        if "position_ids" in rows[0]:
            batch["position_ids"] = torch.from_numpy(positions)
        if with_meta:
            batch["meta"] = [int(r["example_id"]) for r in rows]
        return batch

    # ----------------------------------------------------------------- model
    def restore_assets(self, meta: dict[str, Any]) -> None:
        """Nothing to restore: the labels travel with the prepared data."""
        del meta

    def build_model(self, labels: list[str] | None) -> nn.Module:
        """The decoder with its LM head; with packing, the isolation hook is installed and checked."""
        if (
            self.tokenizer is None
        ):  # data prepared elsewhere (e.g. delivered by Ray): decode with the base one
            self.prepare_tokenizer(load_tokenizer(self.config.model.name, self.config.model.revision))
        model = build_model(self.name, self.config.model, None, vocab_size=len(self.tokenizer))
        if self.config.data.packing:
            model.base_model.register_forward_pre_hook(_isolate_packed_examples, with_kwargs=True)
            if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 built it partitioned
                log.debug("packing isolation not checked: the model was constructed partitioned (ZeRO-3)")
            else:
                check_packing_isolation(model)
        return model

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        """Response tokens that are predicted (labels shifted by one: position 0 predicts nothing)."""
        return token_count(batch["labels"][:, 1:])

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Summed next-token cross-entropy over response tokens."""
        return token_cross_entropy_sum(*shifted(outputs.logits, batch["labels"]))

    # ----------------------------------------------------------------- evaluation
    def predictions(self, outputs: Any, batch: Batch) -> list[tuple[int, tuple[float, int]]]:
        """Per example: summed negative log-likelihood of its response tokens and their number."""
        logits = outputs.logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        sums, counts = nll.sum(1).tolist(), (target != IGNORE).sum(1).tolist()
        return [(i, (s, int(c))) for i, s, c in zip(batch["meta"], sums, counts, strict=True)]

    def score(
        self, predictions: dict[int, tuple[float, int]], split: pa.Table, labels: list[str]
    ) -> dict[str, Any]:
        """Token-level loss (mean NLL of response tokens) and perplexity."""
        ids = split.column("example_id").to_pylist()
        nll = sum(predictions[i][0] for i in ids)
        tokens = sum(predictions[i][1] for i in ids)
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "examples": len(ids)}

    def format_report(self, metrics: dict[str, Any]) -> str:
        lines = [
            f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  "
            f"({metrics['tokens']:,} response tokens in {metrics['examples']:,} examples)"
        ]
        samples = metrics.get("samples") or {}
        for prompt, generated in zip(samples.get("prompt", []), samples.get("generated", []), strict=True):
            lines += [f"\n> {prompt.strip()[-200:]}", generated]
        return "\n".join(lines)

    @torch.no_grad()
    def generate_ids(
        self, model: nn.Module, prompts: list[list[int]], batch_size: int, progress: Any = None
    ) -> list[str]:
        """Greedy continuations of token-id prompts (left-padded batches, shortest first), decoded."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        texts = [""] * len(prompts)
        device = next(model.parameters()).device
        eos = self.tokenizer.eos_token_id
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        partitioned = world > 1 and any(hasattr(p, "ds_id") for p in model.parameters())
        for chunk in progress.wrap(batches, total=len(batches), desc="generate") if progress else batches:
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(prompts[i]) :] = torch.as_tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=self.config.data.max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_token_id,
                eos_token_id=eos,
                synced_gpus=partitioned,  # ZeRO-3: ranks keep forwarding until all have finished
            )
            for row, i in enumerate(chunk):
                texts[i] = self.tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
        return texts

    def generate_samples(self, model: nn.Module, split: pa.Table) -> dict[str, list[str]] | None:
        """Generated responses for the first ``data.generate_samples`` evaluation prompts (or ``None``)."""
        count = self.config.data.generate_samples
        if not count or "prompt_length" not in split.column_names:
            return None
        head = split.slice(0, count)
        ids = head.column("input_ids").to_pylist()
        cut = head.column("prompt_length").to_pylist()
        prompts = [row[:n] for row, n in zip(ids, cut, strict=True)]
        decode = self.tokenizer.decode
        return {
            "prompt": [decode(p, skip_special_tokens=False) for p in prompts],
            "reference": [
                decode(row[n:], skip_special_tokens=True).strip() for row, n in zip(ids, cut, strict=True)
            ],
            "generated": self.generate_ids(model, prompts, self.config.eval.batch_size),
        }

    # ----------------------------------------------------------------- prediction
    def read_unlabeled(self, path: str, fmt: str, tokenizer: Any) -> pa.Table:
        """``text``: one prompt per line; ``jsonl``: prompts or chats (a final answer is the reference)."""
        self.prepare_tokenizer(tokenizer)
        if fmt not in PREDICT_FORMATS:
            raise DataError(
                f"--format {fmt!r} does not fit {self.name}; use one of {', '.join(PREDICT_FORMATS)}"
            )
        if fmt == "jsonl":
            return self.read(path, need_response=False)
        chats, lines = [], []
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    chats.append(
                        json.dumps([{"role": "user", "content": raw.rstrip("\r\n")}], ensure_ascii=False)
                    )
                    lines.append(number)
        if not chats:
            raise DataError(f"{path}: no prompts to complete")
        return pa.table(
            {"messages": chats, "kind": ["prompt"] * len(chats), "line": pa.array(lines, pa.int64())}
        )

    def _prompt(self, chat: list[Message]) -> tuple[list[Message], str | None]:
        """The chat up to the response to generate, and the given final answer (a reference) if any."""
        if chat[-1]["role"] == "assistant":
            return chat[:-1], chat[-1]["content"]
        return chat, None

    def encode_unlabeled(self, inputs: pa.Table, tokenizer: Any) -> pa.Table:
        """Prompt ids ending with the generation prompt (the last ``data.max_length`` tokens of long ones)."""
        assert self.renderer is not None
        texts = [
            self.renderer.render(self._prompt(json.loads(m))[0], generation_prompt=True)[0]
            for m in inputs.column("messages").to_pylist()
        ]
        ids = tokenizer(texts, add_special_tokens=self.renderer.add_special_tokens)["input_ids"]
        ids = [row[-self.config.data.max_length :] for row in ids]
        return pa.table(
            {
                "example_id": pa.array(np.arange(len(ids)), pa.int64()),
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "length": pa.array([len(row) for row in ids], pa.int32()),
            }
        )

    def generate(
        self, model: nn.Module, encoded: pa.Table, batch_size: int, progress: Any = None
    ) -> dict[int, str]:
        """``dft predict``: generated text per example id."""
        texts = self.generate_ids(model, encoded.column("input_ids").to_pylist(), batch_size, progress)
        return dict(zip(encoded.column("example_id").to_pylist(), texts, strict=True))

    def write_predictions(
        self, inputs: pa.Table, predictions: dict[int, str], labels: list[str], output: str | None, fmt: str
    ) -> None:
        """JSONL: the prompt (or the chat), the given ``response`` when there was one, and ``generated``."""
        import sys

        handle = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
        try:
            kinds = inputs.column("kind").to_pylist()
            for i, (raw, kind) in enumerate(zip(inputs.column("messages").to_pylist(), kinds, strict=True)):
                chat, reference = self._prompt(json.loads(raw))
                record: dict[str, Any] = (
                    {"prompt": chat[-1]["content"]} if kind == "prompt" else {"messages": chat}
                )
                if reference is not None:
                    record["response"] = reference
                record["generated"] = predictions[i]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            if output:
                handle.close()
