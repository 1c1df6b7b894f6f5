"""Per-row decode state and its text: token -> text delta, stop strings held back, finish reasons.

A ``Row`` is one alternative being decoded. ``Detokenizer.advance`` appends the row's new
token, decides whether the row finished (EOS, max_tokens, context, a stop string) and
returns the text the caller may see now. Text that could still turn into a stop string (the
last ``len(longest stop) - 1`` characters), or that ends in an incomplete character, is held
back until the next token decides; a stop string found in the text cuts it there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serving.requests import CONTEXT, EOS, MAX_TOKENS, STOP, Event, RequestHandle


@dataclass
class Row:
    """One alternative being decoded."""

    handle: RequestHandle
    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already handed out
    finish: str | None = None


def stop_cut(text: str, stops: Iterable[str], sent: int) -> int:
    """Where the earliest stop string starts in ``text`` (-1: none). Only matches that end
    after the ``sent`` characters already handed out are looked for."""
    return min((i for i in (text.find(x, max(0, sent - len(x))) for x in stops) if i >= 0),
               default=-1)


def releasable(text: str, stops: Iterable[str]) -> int:
    """How many leading characters of an unfinished row's text can be handed out: all but
    what could still become a stop string or is an incomplete character."""
    hold = max((len(x) for x in stops), default=1) - 1
    upto = len(text) - hold
    if text.endswith("\ufffd"):
        upto = min(upto, len(text) - 1)
    return upto


class Detokenizer:
    """Turns each row's new token into an ``Event`` (or nothing yet)."""

    def __init__(self, tokenizer: Any, eos: set[int], context_length: int) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.context_length = context_length

    def advance(self, row: Row, tok: int) -> Event | None:
        h, s = row.handle, row.handle.sampling
        if tok in self.eos:
            row.finish = EOS
        else:
            row.tokens.append(tok)
            if len(row.tokens) >= s.max_new_tokens:
                row.finish = MAX_TOKENS
            elif len(h.prompt_ids) + len(row.tokens) >= self.context_length:
                row.finish = CONTEXT
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if s.stop:
            cut = stop_cut(text, s.stop, row.sent)
            if cut >= 0:
                text, row.finish = text[:cut], STOP
        if row.finish is None:
            upto = releasable(text, s.stop)
            if upto <= row.sent:
                return None
            delta, row.sent = text[row.sent:upto], upto
            return Event(row.index, delta, len(row.tokens))
        delta, row.sent = text[row.sent:], len(text)
        return Event(row.index, delta, len(row.tokens), row.finish)
