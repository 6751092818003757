"""What the scheduler tracks: the samples it generates and the shared prefixes they hang from.

Both are runs of token positions whose K/V live in pages (`KVSequence`). A `Sample` (one of a
request's `n` samples) may sit below a `SharedPrefix`, whose KV covers positions [0, base); the
sample owns only positions from `base` on. Pages are owned per sequence; a sequence's page table
is its prefix chain's pages up to the page holding `base`, then its own pages. When `base` falls
inside a page, that page is the prefix's last, partially filled one: the sample gets its own copy
(copy-on-write) as its first page, so it can append without touching what its siblings read.

A shared prefix is computed once (it samples nothing) and stays resident until the last sample
below it finishes.

With host/device overlap the scheduler plans step N + 1 before it has step N's tokens: a sample's
tokens are its known ones (prompt + committed outputs) followed by `placeholders`, tokens sampled
by steps already sent to the device but not yet committed. Positions are counted with them
(`num_tokens`), and the newest one's value reaches the next step on the device (`last_from`: its
row in the previous plan, whose program's output holds it).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2     # samples: done; prefixes: fully computed and resident


@dataclasses.dataclass(eq=False)
class KVSequence:
    prompt_ids: list[int]           # all tokens from position 0 (prefixes: the shared tokens)
    index: int = 0                  # samples: position among the run's samples; prefixes: < 0
    prefix: Optional["SharedPrefix"] = None
    priority: int = 0               # lower runs first (vLLM's convention)
    order: int = 0                  # position in the plan's admission order
    status: Status = Status.WAITING
    num_computed: int = 0           # positions whose K/V are in the cache (from 0, incl. prefix)
    pages: list[int] = dataclasses.field(default_factory=list)   # own pages only
    reserved_pages: int = 0         # admission control: own pages this sequence may grow to

    samples = False                 # whether its last logits produce tokens

    def __post_init__(self):
        self.num_computed = self.base

    @property
    def base(self) -> int:
        """Positions whose K/V come from the shared prefix."""
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    def token_at(self, i: int) -> int:
        return self.prompt_ids[i]

    def tokens(self, start: int, n: int) -> list[int]:
        return self.prompt_ids[start:start + n]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the whole (own) prompt at first, 1 while decoding."""
        return self.num_tokens - self.num_computed

    @property
    def longest(self) -> int:
        """The most positions this sequence can grow to (what admission reserves pages for)."""
        return self.num_tokens

    @property
    def sort_key(self):
        return (self.priority, self.order, self.index)

    def first_own_page(self, page_size: int) -> int:
        return self.base // page_size

    def page_table(self, page_size: int) -> list[int]:
        if self.prefix is None:
            return self.pages
        return self.prefix.page_table(page_size)[:self.first_own_page(page_size)] + self.pages

    def ancestors(self):
        p = self.prefix
        while p is not None:
            yield p
            p = p.prefix


@dataclasses.dataclass(eq=False)
class SharedPrefix(KVSequence):
    """A prefix shared by several samples: prefilled once as a sequence of its own."""

    members_left: int = 0           # unfinished samples below
    num_members: int = 0            # samples below in all (its prefill is shared by them)
    _chain: Optional[list[int]] = None   # full page table once computed

    def page_table(self, page_size: int) -> list[int]:
        if self._chain is not None:
            return self._chain
        return super().page_table(page_size)

    def mark_computed(self, page_size: int) -> None:
        """Resident from now on; its page table no longer changes."""
        self.status = Status.FINISHED
        self._chain = self.page_table(page_size)


@dataclasses.dataclass
class TokenHistory:
    """A sample's distinct tokens and how often it generated each (penalties), kept incrementally.
    Prompt tokens are listed with count 0 when the repetition penalty needs them ("seen", not
    "generated")."""

    ids: list[int] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    slot: dict = dataclasses.field(default_factory=dict)

    def add(self, token: int, count: int = 1) -> None:
        j = self.slot.get(token)
        if j is None:
            self.slot[token] = len(self.ids)
            self.ids.append(token)
            self.counts.append(count)
        else:
            self.counts[j] += count


@dataclasses.dataclass(eq=False)
class Sample(KVSequence):
    """One of a request's n samples: the unit that is scheduled, generates tokens and finishes."""

    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    placeholders: int = 0           # tokens sampled on the device, not committed yet
    last_from: Optional[int] = None  # row of the previous plan that samples the newest placeholder
    request: int = 0                # the user's request this is a sample of
    sample: int = 0                 # which of the request's n samples
    seed: int = 0                   # its own random stream
    stop_ids: frozenset = frozenset()
    max_len: int = 1 << 30          # prompt + generated may not exceed this (max_model_len)
    expected_output_len: Optional[int] = None   # the planner's estimate (None: max_tokens)
    group: Optional[SharedPrefix] = None   # shared prefix read once per group in attention
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_checker: Optional[object] = None  # stop strings: `.add(token, active) -> text | None`
    stop_text: Optional[str] = None        # final text when a stop string ended the sample
    num_preemptions: int = 0
    # Extras, when the params ask for them.
    history: Optional[TokenHistory] = None           # penalties
    logprobs: Optional[list[dict]] = None            # one {token: logprob} per output token
    prompt_logprobs: Optional[list] = None           # one entry per prompt position
    prompt_logprobs_done: int = 0                    # positions recorded so far

    samples = True

    def __post_init__(self):
        super().__post_init__()
        p = self.params
        if p.has_penalties and self.history is None:
            self.history = TokenHistory()
            if p.repetition_penalty != 1.0:
                for t in dict.fromkeys(self.prompt_ids):
                    self.history.add(t, 0)
        if p.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.wants_prompt_logprobs and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Sample 0 of a request with prompt_logprobs computes (and reports) them."""
        return self.params.prompt_logprobs is not None and self.sample == 0

    @property
    def num_generated(self) -> int:
        """Tokens generated so far, placeholders included (the index of the next one)."""
        return len(self.output_ids) + self.placeholders

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + self.num_generated

    def token_at(self, i: int) -> int:
        """The token at position i; -1 for a placeholder (its value is on the device)."""
        n = len(self.prompt_ids)
        if i < n:
            return self.prompt_ids[i]
        return self.output_ids[i - n] if i - n < len(self.output_ids) else -1

    def tokens(self, start: int, n: int) -> list[int]:
        if start + n <= len(self.prompt_ids):
            return self.prompt_ids[start:start + n]
        return [self.token_at(i) for i in range(start, start + n)]

    @property
    def remaining(self) -> int:
        """Tokens this sample may still generate (max_tokens and max_model_len)."""
        return min(self.params.max_tokens - self.num_generated, self.max_len - self.num_tokens)

    @property
    def longest(self) -> int:
        return min(len(self.prompt_ids) + self.params.max_tokens, self.max_len)

    def append(self, token: int, logprobs: Optional[dict] = None) -> None:
        """Record a sampled token (and its logprobs) and decide whether the sample is done."""
        if self.placeholders:
            self.placeholders -= 1
            if not self.placeholders:
                self.last_from = None
        self.output_ids.append(token)
        if self.history is not None:
            self.history.add(token)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
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
        if n_out >= self.params.max_tokens or len(self.prompt_ids) + n_out >= self.max_len:
            self.finish_reason = "length"
