"""Streaming text for a growing list of output ids, on `tokenizers.decoders.DecodeStream` (which
holds a multi-byte character split across tokens back until it is complete).

The concatenated stream plus `finish()` equals `decode(all ids)`: `finish()` adds whatever the
full decode has beyond the streamed text (e.g. an incomplete character the output ended on).
"""
from __future__ import annotations

from typing import Iterable


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self.tok = tokenizer
        self.skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""

    def add(self, new_ids: Iterable[int]) -> str:
        """Append ids; return the newly completed text (possibly empty)."""
        out = []
        for i in new_ids:
            self.ids.append(int(i))
            piece = self._stream.step(self.tok.backend, int(i))
            if piece:
                out.append(piece)
        delta = "".join(out)
        self.text += delta
        return delta

    def finish(self) -> str:
        full = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
