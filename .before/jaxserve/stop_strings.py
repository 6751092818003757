"""Stop strings: end a request when its generated text contains one of them.

Text is produced incrementally (one short window decode per token, not a full decode), and only
the tail that a new token can have completed is searched, so the cost per token is constant.
"""
from __future__ import annotations

from typing import Optional, Sequence

from jaxserve.tokenizer import IncrementalDetokenizer


class StopStringChecker:
    def __init__(self, tokenizer, stops: Sequence[str], include_stop: bool):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.stops = list(stops)
        self.include = include_stop
        self.longest = max(len(s) for s in self.stops)

    def add(self, token: int, active: bool = True) -> Optional[str]:
        """Feed one generated token; when a stop string is complete (and `active`), return the
        final text (cut before the stop string, or after it with include_stop_str_in_output)."""
        before = len(self.detok.text)
        self.detok.add([token])
        if not active:
            return None
        text = self.detok.text
        start = max(0, before - self.longest + 1)
        best = None
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        return text[:i + len(s)] if self.include else text[:i]
