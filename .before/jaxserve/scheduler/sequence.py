"""What the scheduler tracks: requests, and the shared prefixes they hang from.

Both are `Sequence`s: a run of token positions whose K/V lives in pages. A request may sit below a
shared prefix (`prefix`), whose KV covers positions [0, base); the request owns only positions from
`base` on. Pages are owned per sequence; a sequence's page table is its prefix chain's pages up to
the page holding `base`, then its own pages. When `base` falls inside a page, that page is the
prefix's last, partially filled one: the sequence gets its own copy (copy-on-write) as its first
page, so it can append without touching what its siblings read.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from jaxserve.outputs import RequestMetrics
from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2     # requests: done; prefixes: fully computed and resident


@dataclasses.dataclass(eq=False)
class Sequence:
    index: int                      # requests: position in the user's input (outputs keep this order)
    prompt_ids: list[int]           # all tokens from position 0 (prefixes: the shared tokens)
    params: Optional[SamplingParams]
    seed: int = 0                   # the request's own random stream (given or derived from index)
    stop_ids: frozenset = frozenset()
    max_len: int = 1 << 30          # prompt + generated may not exceed this (max_model_len)
    priority: int = 0               # lower runs first (vLLM's convention)
    prefix: Optional["Sequence"] = None   # shared prefix this sequence continues
    is_prefix: bool = False
    group: Optional["Sequence"] = None    # shared prefix used for cascade attention (requests)
    order: int = 0                  # position in the plan's scheduling order
    request: int = -1               # the user's request this is a sample of (-1: same as index)
    sample: int = 0                 # which of the request's n samples
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0           # positions whose K/V are in the cache (from 0, incl. the prefix)
    pages: list[int] = dataclasses.field(default_factory=list)   # own pages only
    reserved_pages: int = 0         # admission control: own pages this sequence may grow to
    members_left: int = 0           # prefixes: unfinished requests below
    finish_reason: Optional[str] = None
    stop_checker: Optional[object] = None   # stop strings (jaxserve.stop_strings), if any
    stop_text: Optional[str] = None         # final text when a stop string ended the request
    metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)
    _chain: Optional[list[int]] = None    # prefixes: cached full page list once computed

    def __post_init__(self):
        self.num_computed = self.base

    @property
    def base(self) -> int:
        """Positions whose K/V come from the shared prefix."""
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the whole (own) prompt at first, 1 while decoding."""
        return self.num_tokens - self.num_computed

    @property
    def remaining(self) -> int:
        """Tokens this request may still generate (max_tokens and max_model_len)."""
        return min(self.params.max_tokens - len(self.output_ids), self.max_len - self.num_tokens)

    @property
    def sort_key(self):
        return (self.priority, self.order, self.index)

    def first_own_page(self, page_size: int) -> int:
        return self.base // page_size

    def page_table(self, page_size: int) -> list[int]:
        if self._chain is not None:
            return self._chain
        if self.prefix is None:
            return self.pages
        return self.prefix.page_table(page_size)[:self.first_own_page(page_size)] + self.pages

    def ancestors(self):
        p = self.prefix
        while p is not None:
            yield p
            p = p.prefix

    def append(self, token: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.output_ids.append(token)
        n_out = len(self.output_ids)
        if token in self.stop_ids and n_out >= self.params.min_tokens:
            self.finish_reason = "stop"
            return
        if self.stop_checker is not None:
            text = self.stop_checker.add(token, active=n_out >= self.params.min_tokens)
            if text is not None:
                self.finish_reason = "stop"
                self.stop_text = text
                return
        if n_out >= self.params.max_tokens or self.num_tokens >= self.max_len:
            self.finish_reason = "length"
