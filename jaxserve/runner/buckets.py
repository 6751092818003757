"""The one place that decides padded shapes: token buckets of a step, and the page-table widths a
batch compiles programs for."""
from __future__ import annotations

import bisect
import dataclasses


def _token_buckets(lo: int, cap: int, mid_from: int = 0, quarter_from: int = 0) -> list[int]:
    """Powers of two from `lo`, from `mid_from` on (0: never) also 1.5x each, and from
    `quarter_from` on (0: never) also 1.25x and 1.75x, up to `cap`."""
    out, v = [], lo
    while v < cap:
        out.append(v)
        steps = []
        if mid_from and v >= mid_from:
            steps.append(6)
        if quarter_from and v >= quarter_from:
            steps += [5, 6, 7]
        out += [v * q // 4 for q in steps if v * q // 4 < cap]
        v *= 2
    out.append(cap)  # capped at the budget, never above: a bucket past it only pads
    return sorted(set(out))


PAGE_ROUND = 16   # a batch's page-table width is its longest request's pages, rounded up to this


@dataclasses.dataclass(frozen=True)
class BucketSet:
    token_buckets: tuple[int, ...]   # T: tokens in a step
    max_num_seqs: int
    max_pages_per_seq: int
    # > 1: page-table widths are powers of this factor and a batch compiles every width up to its
    # longest request (the gather-based reference attention costs what its width holds). 1: one
    # width per batch, its longest request's pages (kernels stop at each row's length).
    page_growth: int = 1

    @classmethod
    def make(cls, max_num_batched_tokens: int, max_num_seqs: int, max_pages_per_seq: int,
             page_growth: int = 1, min_tokens: int = 16, mid_from: int = 0,
             quarter_from: int = 0) -> "BucketSet":
        tokens = _token_buckets(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens,
                                mid_from, quarter_from)
        return cls(tuple(tokens), max_num_seqs, max_pages_per_seq, page_growth)

    def seqs_for(self, num_tokens_bucket: int) -> int:
        # A step has at most one row per token, so S never needs to exceed T: one program per T.
        return min(num_tokens_bucket, self.max_num_seqs)

    def token_bucket(self, num_tokens: int) -> int:
        return self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]

    def tokens_upto(self, num_tokens: int) -> list[int]:
        """Token buckets a step of at most `num_tokens` tokens can use."""
        cap = self.token_bucket(min(num_tokens, self.token_buckets[-1]))
        return [t for t in self.token_buckets if t <= cap]

    def pages_upto(self, num_pages: int) -> list[int]:
        """Page-table widths to compile for a batch whose longest sequence needs `num_pages`."""
        num_pages = min(max(num_pages, 1), self.max_pages_per_seq)
        if self.page_growth <= 1:
            return [min(-(-num_pages // PAGE_ROUND) * PAGE_ROUND, self.max_pages_per_seq)]
        out, v = [], 1
        while v < num_pages:
            out.append(v)
            v *= self.page_growth
        out.append(min(v, self.max_pages_per_seq))
        return out
