"""Tokens to text, one token at a time: incremental detokenization that
never emits half a UTF-8 character, and stop strings that end a request
without ever sending any part of themselves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Detokenizer", "StopStrings"]

#: Prompt tokens decoded before the first generated token, so that the first
#: token's leading space (or word joining) comes out as it does in the
#: prompt-plus-completion text.
_CONTEXT = 5


class Detokenizer:
    """Turns a stream of token ids into text deltas.

    Each step decodes a short window (the tokens since the last emitted
    text, plus a few before them for context) rather than the whole
    sequence, and holds back text that ends in U+FFFD: a character whose
    UTF-8 bytes span several tokens is emitted once all of them arrived.
    The deltas concatenate to what ``tokenizer.decode`` gives for the
    prompt plus the completion, minus the prompt's text.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_ids: the prompt (its last tokens give the first token context).
        skip_special_tokens: drop special tokens (end-of-sequence) from text.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = [int(t) for t in prompt_ids[-_CONTEXT:]]
        self.prefix = 0  # start of the decoding window
        self.read = len(self.ids)  # tokens before it were emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Adds one token; returns the new text (possibly empty)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of
        a finished request comes out as U+FFFD, as ``decode`` gives it)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


class StopStrings:
    """Finds the first stop string in a request's text.

    Text is released only once no stop string can begin in it: the last
    ``len(longest stop) - 1`` characters are held back until more text
    shows they start no stop string, so a streaming client never receives
    part of a stop string. The stop string itself is not returned (as in
    the OpenAI API).
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Adds text; returns what may be sent now. Sets ``stopped`` once a
        stop string appeared (the returned text then ends before it)."""
        if self.stopped:
            return ""
        self.text += delta
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            end = max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def flush(self) -> str:
        """The held-back text, once the request finished without a stop
        string."""
        if self.stopped:
            return ""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
