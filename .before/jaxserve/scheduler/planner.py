"""The batch plan, made before the first step: shared prefixes, cascade groups and the order in
which requests are admitted.

Policies:
  fifo       input order (priority first).
  batchllm   groups kept together (a depth-first walk of the prefix tree); sibling subtrees ordered
             by decode/prefill ratio, highest first, so decode work is running when the long
             prefills of prefill-heavy groups arrive.
  blendserve groups ordered by compute density (BlendServe): a dual scan from the memory-bound and
             compute-bound ends that keeps the admitted mix near the whole batch's density.
Output lengths are taken from each request's max_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.config import ModelConfig
from jaxserve.scheduler.prefix_tree import PrefixTree, TreeNode, build_prefix_tree
from jaxserve.scheduler.sequence import Sequence

POLICIES = ("fifo", "batchllm", "blendserve")


@dataclasses.dataclass
class BatchPlan:
    prefixes: list[Sequence]            # shared prefixes, parents before children
    tree: Optional[PrefixTree]
    num_groups: int                     # cascade groups (one level, BatchLLM flatten)

    @property
    def optimal_prefill_tokens(self) -> Optional[int]:
        return self.tree.optimal_prefill_tokens if self.tree is not None else None


def _assign_groups(tree: PrefixTree) -> dict:
    """BatchLLM's one-level flatten: shared node -> the cascade group node it reads through.

    A top-level shared node is a group. A shared node below group c is lifted into a group of its
    own when the members below it save more prefix reads than the lift costs:
    (leaves - 1) * (tokens between c and it) > depth(c).
    """
    group_of: dict = {}

    def visit(node: TreeNode, group: Optional[TreeNode]):
        for c in node.children:
            if group is None:
                g = c
            elif (c.num_leaves - 1) * (c.depth - group.depth) > group.depth:
                g = c
            else:
                g = group
            group_of[c] = g
            visit(c, g)

    visit(tree.root, None)
    return group_of


def _kv_reads(s: Sequence) -> float:
    """BlendServe's memory term of one request, up to constants: KV tokens read over its decode."""
    p, d = len(s.prompt_ids), s.params.max_tokens
    return p * d + d * d / 2


def plan_batch(seqs: list[Sequence], *, sharing: bool, policy: str,
               model_cfg: Optional[ModelConfig] = None) -> BatchPlan:
    """Create the shared prefixes, link requests to them and set every request's `order`."""
    if policy not in POLICIES:
        raise ValueError(f"schedule_policy={policy!r} is not one of {', '.join(POLICIES)}")
    tree = build_prefix_tree([s.prompt_ids for s in seqs]) if sharing and seqs else None
    prefixes: list[Sequence] = []
    node_seq: dict = {}
    groups = 0
    if tree is not None:
        group_of = _assign_groups(tree)
        groups = len(set(group_of.values()))
        for k, node in enumerate(tree.shared):   # parents come before children
            parent = node_seq.get(node.parent)
            ps = Sequence(index=-1 - k, prompt_ids=seqs[node.first].prompt_ids[:node.depth],
                          params=None, prefix=parent, is_prefix=True,
                          members_left=node.num_leaves, priority=min(
                              s.priority for s in seqs))
            node_seq[node] = ps
            prefixes.append(ps)
        for s, node in zip(seqs, tree.leaf_node):
            if node is not None:
                s.prefix = node_seq[node]
                s.num_computed = s.base
                s.group = node_seq[group_of[node]]
        # A prefix runs at the most urgent priority of the requests below it.
        for p in prefixes:
            p.priority = 1 << 30
        for s in seqs:
            for p in s.ancestors():
                p.priority = min(p.priority, s.priority)

    if policy == "fifo" or tree is None:
        for s in seqs:
            s.order = s.index
        return BatchPlan(prefixes, tree, groups)

    # Aggregates per shared node, bottom-up: prompt tokens, output tokens, tokens to compute.
    by_node: dict = {}
    for s in seqs:
        by_node.setdefault(s.prefix, []).append(s)
    agg: dict = {}
    for node in reversed(tree.shared):           # children before parents
        direct = by_node.get(node_seq[node], [])
        m = sum(_kv_reads(s) for s in direct)
        d = sum(s.params.max_tokens for s in direct)
        pu = node.own_len + sum(len(s.prompt_ids) - s.base for s in direct)
        for c in node.children:
            cm, cd, cpu = agg[c]
            m, d, pu = m + cm, d + cd, pu + cpu
        agg[node] = (m, d, pu)

    def ratio(node):   # decode per computed prefill token, highest first
        m, d, pu = agg[node]
        return -d / max(pu, 1)

    def walk(node: TreeNode, out: list):
        out.extend(by_node.get(node_seq[node], []))
        for c in sorted(node.children, key=ratio):
            walk(c, out)

    # Units kept contiguous: each top-level subtree, and each request outside any shared prefix.
    units: list[tuple[list, tuple]] = []
    for node in tree.root.children:
        members: list = []
        walk(node, members)
        units.append((members, agg[node]))
    for s in by_node.get(None, []):
        units.append(([s], (_kv_reads(s), s.params.max_tokens, len(s.prompt_ids))))

    if policy == "batchllm":
        order = sorted(range(len(units)), key=lambda i: -units[i][1][1] / max(units[i][1][2], 1))
    else:  # blendserve: density-sorted units, dual scan toward the batch's own density
        # Compute term: tokens computed (prefill once per shared prefix + decode); memory term: KV
        # read during decode. Constants (FLOP/s, bandwidth, bytes per token) scale both sides alike.
        terms = [(pu + d, m) for _, (m, d, pu) in units]
        dens = [c / max(m, 1e-9) for c, m in terms]
        srt = sorted(range(len(units)), key=lambda i: dens[i])   # memory-bound first
        target = sum(c for c, _ in terms) / max(sum(m for _, m in terms), 1e-9)
        lo, hi = 0, len(srt) - 1
        acc_c = acc_m = 0.0
        order = []
        while lo <= hi:
            # Take from the compute-bound end while the mix so far is memory-bound, else the other.
            if acc_m > 0 and acc_c / acc_m < target:
                i = srt[hi]
                hi -= 1
            else:
                i = srt[lo]
                lo += 1
            order.append(i)
            acc_c += terms[i][0]
            acc_m += terms[i][1]
    k = 0
    for i in order:
        for s in units[i][0]:
            s.order = k
            k += 1
    return BatchPlan(prefixes, tree, groups)
