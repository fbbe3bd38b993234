r"""Instruction data for causal-LM tuning: chat validation, rendering, response-only labels, packing.

The plain template (used when the tokenizer has no chat template, or with ``data.chat_template=plain``)::

    ### System:\n{system}\n\n### Instruction:\n{user}\n\n### Response:\n{assistant}{eos}\n\n

(``\n`` is a newline; the system block is present only when the chat has a system message.)
"""

from __future__ import annotations

import bisect
import json
from typing import Any

from distributed_ft.data.readers import RowLocation
from distributed_ft.errors import ConfigError, DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")
PLAIN_HEADS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
PLAIN_SEPARATOR = "\n\n"

Message = dict[str, str]


def validate_messages(
    value: Any, where: str | RowLocation, column: str, need_response: bool = True
) -> list[Message]:
    """Check a chat: a list of ``{"role": system|user|assistant, "content": str}``, ending with the answer."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {column!r} is a string but not a JSON list ({e.msg})") from None
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {column!r} must be a non-empty list of {{'role': ..., 'content': ...}} objects"
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(
                f"{where}: {column}[{i}] must be an object with 'role' one of {', '.join(ROLES)}, "
                f"found {message!r}"
            )
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {column}[{i}] ({message['role']}) needs a string 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    roles = [m["role"] for m in messages]
    if need_response and roles[-1] != "assistant":
        raise DataError(
            f"{where}: the last message of {column!r} must be the assistant's "
            "(the loss is on assistant turns)"
        )
    if "assistant" in roles and "user" not in roles[: roles.index("assistant")]:
        raise DataError(f"{where}: the first assistant message of {column!r} needs a user message before it")
    return messages


def nonempty_string(value: Any, where: str | RowLocation, column: str) -> str:
    """``value`` when it is a non-empty string; raises naming ``where`` otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {column!r} must be a non-empty string, found {value!r}")
    return value


# --------------------------------------------------------------------------- rendering
class Renderer:
    """Messages to text plus the character spans of the assistant turns (chat template or plain)."""

    def __init__(self, tokenizer: Any, mode: str) -> None:
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template if mode == "auto" and tokenizer.chat_template else None
        if self.template is None and not tokenizer.eos_token:
            raise ConfigError(
                "the plain template ends each response with the eos token; this tokenizer has none"
            )

    @property
    def name(self) -> str:
        return "chat-template" if self.template else "plain"

    @property
    def add_special_tokens(self) -> bool:
        """Plain text gets the tokenizer's own special tokens (e.g. BOS); chat templates write their own."""
        return self.template is None

    def _apply(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render(
        self, messages: list[Message], generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """``(text, assistant spans)``; with ``generation_prompt`` the text ends where a response starts."""
        if self.template is None:
            return self._plain(messages, generation_prompt)
        text = self._apply(messages, generation_prompt)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply(messages[:i], True)
            upto = self._apply(messages[: i + 1], False).rstrip()
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ConfigError(
                    "the tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so response tokens cannot be located; set data.chat_template=plain"
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def _plain(self, messages: list[Message], generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        text, spans = "", []
        for message in messages:
            text += PLAIN_HEADS[message["role"]]
            body = message["content"]
            if message["role"] == "assistant":
                body += self.tokenizer.eos_token
                spans.append((len(text), len(text) + len(body)))
            text += body + PLAIN_SEPARATOR
        if generation_prompt:
            text += PLAIN_HEADS["assistant"]
        return text, spans


def response_labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Token ids where a token overlaps an assistant span, ``IGNORE`` elsewhere (always at position 0)."""
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if t and end > start and any(start < b and end > a for a, b in spans):
            labels[t] = ids[t]
    return labels


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: groups of example indices whose lengths sum to at most ``capacity``."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]
