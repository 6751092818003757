"""Host-side page allocator with refcounts.

Pages are plain ints; the device only ever sees page-table arrays built from them. Page 0 is the
sink: padded token slots write their K/V there, so it is never handed out.
"""
from __future__ import annotations


class OutOfPages(RuntimeError):
    pass


class PagePool:
    SINK = 0

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (one is the sink)")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._ref = [0] * num_pages
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for p in out:
            self._ref[p] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def incref(self, pages) -> None:
        for p in pages:
            assert self._ref[p] > 0, f"incref of free page {p}"
            self._ref[p] += 1

    def release(self, pages) -> None:
        """Drop one reference to each page; pages nobody holds go back to the free list."""
        for p in pages:
            r = self._ref[p] - 1
            assert r >= 0, f"double free of page {p}"
            self._ref[p] = r
            if r == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._ref[page]
