"""The one place that decides padded shapes. Every jitted step runs at one of these sizes, and all
of them are compiled at start-up, so nothing compiles mid-run."""
from __future__ import annotations

import bisect
import dataclasses


def _pow2_upto(lo: int, cap: int) -> list[int]:
    out, v = [], lo
    while v < cap:
        out.append(v)
        v *= 2
    out.append(cap)  # capped at the budget, never above: a bucket past it only pads
    return sorted(set(out))


@dataclasses.dataclass(frozen=True)
class BucketSet:
    token_buckets: tuple[int, ...]   # T: tokens in a step
    page_buckets: tuple[int, ...]    # P: page-table width (pages per sequence)
    max_num_seqs: int

    @classmethod
    def make(cls, max_num_batched_tokens: int, max_num_seqs: int, max_pages_per_seq: int,
             page_growth: int = 4, min_tokens: int = 16) -> "BucketSet":
        tokens = _pow2_upto(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens)
        if page_growth <= 1:
            pages = [max_pages_per_seq]
        else:
            pages, v = [], 1
            while v < max_pages_per_seq:
                pages.append(v)
                v *= page_growth
            pages.append(max_pages_per_seq)
        return cls(tuple(tokens), tuple(sorted(set(pages))), max_num_seqs)

    def seqs_for(self, num_tokens_bucket: int) -> int:
        # A step has at most one row per token, so S never needs to exceed T: one program per T.
        return min(num_tokens_bucket, self.max_num_seqs)

    def pick(self, num_tokens: int, num_pages: int) -> tuple[int, int]:
        t = self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]
        p = self.page_buckets[bisect.bisect_left(self.page_buckets, num_pages)]
        return t, p

    def decode_block_keys(self) -> list[tuple[int, int]]:
        """Buckets a fused decode block can use: one token per row, so T <= the row limit's bucket."""
        t_max = self.token_buckets[bisect.bisect_left(self.token_buckets,
                                                      min(self.max_num_seqs, self.token_buckets[-1]))]
        return [(t, p) for t in self.token_buckets if t <= t_max for p in self.page_buckets]

    def all(self) -> list[tuple[int, int]]:
        return [(t, p) for t in self.token_buckets for p in self.page_buckets]
