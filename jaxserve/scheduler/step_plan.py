"""What the scheduler hands the runner for one step: plain data, no scheduler objects.

A `StepPlan` lists the rows of one step (or of a fused block of decode steps). Each `PlannedRow`
says which tokens of one sequence to compute, where their K/V go (its page table), how to sample
its next token, and what extras it asks for. The runner turns rows into padded device arrays
(`jaxserve.runner.step_inputs`) and never sees a scheduler's sequence.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

# Copy-on-write page copies one step can carry (the runner's input has this many slots).
MAX_COPIES = 32


@dataclasses.dataclass
class RowSampling:
    """How a row's next token is drawn; fixed per sample for the whole run."""

    temperature: float = 0.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_ids: tuple = ()            # sorted; banned while below min_tokens
    min_tokens: int = 0
    logprobs: bool = False          # the runner returns top-k and sampled-token logprobs
    # Penalties (0 / 0 / 1 = off) and the history they act on.
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0

    @property
    def has_penalties(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0


@dataclasses.dataclass
class PlannedRow:
    token_ids: list[int]            # the tokens computed this step, positions [start, start + n);
                                    # -1: a token only the device has (see last_token_from)
    start: int
    page_table: list[int]           # layer-local pages of the whole context, prefix pages first
    samples: bool = False           # the row's last logits draw its next token
    sampling: Optional[RowSampling] = None   # sampling rows only
    num_generated: int = 0          # tokens the sample has generated so far (its random stream index)
    remaining: int = 0              # tokens it may still generate (fused blocks stop on device)
    # The row's last token was sampled by the previous plan, whose output has not reached the
    # host: that plan's row, whose newest token the device takes from the previous program.
    last_token_from: Optional[int] = None
    # Shared-prefix group this row reads once per group: a key naming the group in this step and
    # the group prefix's full pages (whole pages only; the partial last page is the row's own).
    group: Optional[int] = None
    group_pages: Optional[list[int]] = None
    # Penalty history of a sampling row with penalties: distinct tokens, times generated.
    history: Optional[tuple[list[int], list[int]]] = None
    # Prompt logprobs: for each token of the row, the prompt token whose logprob its logits give
    # (-1: none), or None when the row records none.
    prompt_logprob_targets: Optional[list[int]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.samples and len(self.token_ids) == 1 and self.num_generated > 0

    @property
    def needs_extras(self) -> bool:
        """Whether this row needs the programs that compute logprobs, penalties or prompt logprobs."""
        if self.prompt_logprob_targets is not None:
            return True
        sp = self.sampling
        return self.samples and sp is not None and (sp.logprobs or sp.has_penalties)


@dataclasses.dataclass
class StepPlan:
    rows: list[PlannedRow]
    decode_steps: int = 1           # > 1: a fused block of decode steps (every row decodes)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst) pages
    # The scheduler's sequences, row for row, for its own commit (the runner never reads them).
    owners: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def max_seq_len(self) -> int:
        """Longest KV length any row reaches in this plan (a fused block counts all its steps)."""
        if self.decode_steps > 1:
            return max(r.start + min(self.decode_steps, r.remaining) for r in self.rows)
        return max(r.end for r in self.rows)

    @property
    def needs_extras(self) -> bool:
        return any(r.needs_extras for r in self.rows)
