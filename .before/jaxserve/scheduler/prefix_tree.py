"""The global prefix tree of a whole batch (BatchLLM), built before the first step.

Every prompt contributes its first `len - 1` tokens (the last token is always the request's own: its
logits give the request's first sample). Internal nodes of the compressed trie (LCP intervals over
the sorted prompts) are the shared prefixes: each is computed once and its KV pages are kept until
the last request under it finishes. Built from sorting + adjacent longest-common-prefix, so it
costs O(n log n) comparisons rather than a Python trie walk over every token.

`optimal_prefill_tokens` is the tree's own count: the tokens of every shared node once, plus each
request's tokens below its deepest shared node.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass(eq=False)
class TreeNode:
    depth: int                          # prefix length in tokens (end position of this node)
    parent: Optional["TreeNode"] = None
    children: list = dataclasses.field(default_factory=list)
    requests: list = dataclasses.field(default_factory=list)  # request ids ending exactly here
    num_leaves: int = 0                 # requests in this subtree
    first: int = 0                      # a request id in this subtree (its tokens spell the prefix)

    @property
    def start(self) -> int:
        return self.parent.depth if self.parent is not None else 0

    @property
    def own_len(self) -> int:
        return self.depth - self.start


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    neq = np.flatnonzero(a[:m] != b[:m])
    return int(neq[0]) if len(neq) else m


@dataclasses.dataclass
class PrefixTree:
    root: TreeNode
    shared: list[TreeNode]              # internal nodes with own tokens, parents before children
    leaf_node: list[Optional[TreeNode]]  # request id -> deepest shared node above it (or None)
    prompt_tokens: int
    optimal_prefill_tokens: int

    @property
    def reuse_ratio(self) -> float:
        return 1 - self.optimal_prefill_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def depth_levels(self) -> int:
        def lvl(n):
            return 0 if n is None else 1 + lvl(n.parent if n.parent is not self.root else None)
        return max((lvl(n) for n in self.shared), default=0)


def build_prefix_tree(prompts: Sequence[Sequence[int]], min_shared_tokens: int = 1) -> PrefixTree:
    """Radix tree over `prompt[:-1]` of every prompt (request id = index in `prompts`)."""
    n = len(prompts)
    prompts = [p if isinstance(p, list) else list(p) for p in prompts]
    # Sorting whole prompts keeps every set of prompts sharing a key prefix contiguous, which is all
    # the construction needs, without copying 100k keys into tuples.
    order = sorted(range(n), key=prompts.__getitem__)
    root = TreeNode(depth=0)
    # LCP-interval construction: a stack of open nodes of increasing depth along the sorted order.
    stack = [root]
    leaf_parent: list[Optional[TreeNode]] = [None] * n
    prev = None
    prev_key = None
    for i in order:
        key = np.asarray(prompts[i][:-1], np.int32)
        lcp = _lcp(prev_key, key) if prev is not None else 0
        # Close nodes deeper than the common prefix with the previous prompt.
        last_closed = None
        while stack[-1].depth > lcp:
            last_closed = stack.pop()
            if stack[-1].depth < lcp:
                # The closed node and the new prompt branch at depth `lcp` inside its edge: split.
                mid = TreeNode(depth=lcp, parent=stack[-1], first=last_closed.first)
                stack[-1].children.remove(last_closed)
                stack[-1].children.append(mid)
                last_closed.parent = mid
                mid.children.append(last_closed)
                stack.append(mid)
        if stack[-1].depth < lcp:
            # The previous prompt itself ended inside: open a node at the common prefix.
            mid = TreeNode(depth=lcp, parent=stack[-1], first=i)
            stack[-1].children.append(mid)
            stack.append(mid)
            # The previous request hangs below this node too.
            if prev is not None and leaf_parent[prev] is not None and leaf_parent[prev].depth < lcp:
                old = leaf_parent[prev]
                old.requests.remove(prev)
                mid.requests.append(prev)
                leaf_parent[prev] = mid
        # The new prompt's own node at its full key length.
        if len(key) > stack[-1].depth:
            node = TreeNode(depth=len(key), parent=stack[-1], first=i)
            stack[-1].children.append(node)
            stack.append(node)
        stack[-1].requests.append(i)
        leaf_parent[i] = stack[-1]
        prev, prev_key = i, key

    # Count leaves bottom-up and keep as shared the nodes below which 2+ requests live.
    def count(node: TreeNode) -> int:
        node.num_leaves = len(node.requests) + sum(count(c) for c in node.children)
        return node.num_leaves

    count(root)
    shared: list[TreeNode] = []
    deepest: list[Optional[TreeNode]] = [None] * n

    def walk(node: TreeNode, above: Optional[TreeNode]):
        here = above
        if node is not root and node.num_leaves >= 2 and node.depth - (above.depth if above else 0) \
                >= min_shared_tokens:
            # Re-parent onto the nearest shared ancestor: unshared nodes between are not computed.
            node.parent = above if above is not None else root
            shared.append(node)
            here = node
        for r in node.requests:
            deepest[r] = here
        for c in node.children:
            walk(c, here)

    walk(root, None)
    # Rebuild children from the re-parented links: the tree now holds shared nodes only.
    root.children = []
    for node in shared:
        node.children = []
    for node in shared:
        node.parent.children.append(node)
    prompt_tokens = sum(len(p) for p in prompts)
    optimal = sum(nd.own_len for nd in shared) + sum(
        len(prompts[i]) - (deepest[i].depth if deepest[i] is not None else 0) for i in range(n))
    return PrefixTree(root, shared, deepest, prompt_tokens, optimal)
