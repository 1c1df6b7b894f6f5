"""The one way a conversation becomes model input: the model's chat template, then the
tokenizer, with no second BOS (the template writes its own). Serving (requests, bench) and
the learner (RM rows, PPO queries, reference samples, SFT rows) all build prompt ids here,
so what the policy is trained on is what it is asked at serving time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Message = Any
"""A chat turn: a ``{"role", "content"}`` dict, a ``(role, content)`` pair or any object with
``.role`` and ``.content`` (the protobuf ChatMessage)."""


def as_dicts(messages: Iterable[Message]) -> list[dict[str, str]]:
    """Chat turns in the shape chat templates take."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": m["role"], "content": m["content"]})
        elif isinstance(m, (tuple, list)):
            out.append({"role": m[0], "content": m[1]})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def user_turn(text: str) -> list[dict[str, str]]:
    """One user turn: the conversation of a PPO prompt."""
    return [{"role": "user", "content": text}]


def chat_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
             ) -> list[int]:
    """Token ids of ``messages`` through the chat template, by default ready for the
    assistant to answer. A template that rejects the turns raises its own error."""
    text = tokenizer.apply_chat_template(as_dicts(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
