"""The batch plan, made before the first step: shared prefixes, cascade groups and the order in
which requests are admitted.

Policies:
  fifo       input order (priority first).
  batchllm   groups kept together (a depth-first walk of the prefix tree); sibling subtrees ordered
             by decode/prefill ratio, highest first, so decode work is running when the long
             prefills of prefill-heavy groups arrive.
  blendserve BlendServe's resource-aware prefix tree: the admission units (cascade groups, and
             requests outside any shared prefix) in a depth-first walk whose siblings are sorted
             by compute density (`density.py`: memory-heavy first), so a group's members and a
             subtree's groups stay together; then a dual scan that takes units from both ends of
             that order so the admitted mix stays near the batch's own density. The scheduler's
             `admission.BlendAdmission` admits from the two ends each step to keep the running
             mix there. Switches (`BlendOptions`) turn the density order, the dual scan and the
             admission off one by one for ablations.
             A group whose shared prefix is short next to what each member holds of its own (a
             few-shot template, a system prompt) is not kept together: running its members apart
             costs only its short prefix's pages for longer, and ordering them one by one lets
             long decodes start first (a shorter tail).
Output lengths are each sample's `expected_output_len` (the engine's sampled estimate), else its
max_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.config import ModelConfig
from jaxserve.scheduler.density import Costs, DensityModel, expected_len, kv_reads, prefix_share
from jaxserve.scheduler.prefix_tree import PrefixTree, TreeNode, build_prefix_tree
from jaxserve.scheduler.sequence import Sample, SharedPrefix

POLICIES = ("fifo", "batchllm", "blendserve")
# A group holding more than this share of the batch is split into density-sorted chunks (its
# members share the prefix whatever their order), so one huge group still leaves a mix to blend.
MAX_UNIT_SHARE = 1 / 8
MIN_UNIT_SPLIT = 16


@dataclasses.dataclass(frozen=True)
class BlendOptions:
    density_order: bool = True      # siblings by density (else by batchllm's decode/prefill ratio)
    dual_scan: bool = True          # units from both ends of the order (else memory end first)
    admission: bool = True          # the scheduler keeps each step's mix near the batch density


@dataclasses.dataclass
class Unit:
    """Samples admitted together: one cascade group's members (or a chunk of a huge group's), or
    one request outside any shared prefix."""

    samples: list
    costs: Costs
    density: float


@dataclasses.dataclass
class BatchPlan:
    prefixes: list[SharedPrefix]        # shared prefixes, parents before children
    tree: Optional[PrefixTree]
    num_groups: int                     # cascade groups (one level, BatchLLM flatten)
    units: list[Unit] = dataclasses.field(default_factory=list)   # blendserve, in plan order
    costs: Costs = dataclasses.field(default_factory=Costs)      # the whole batch (blendserve)
    density: Optional[DensityModel] = None
    group_of: dict = dataclasses.field(default_factory=dict, repr=False)  # node -> group node
    node_seq: dict = dataclasses.field(default_factory=dict, repr=False)  # node -> SharedPrefix

    @property
    def optimal_prefill_tokens(self) -> Optional[int]:
        return self.tree.optimal_prefill_tokens if self.tree is not None else None

    @property
    def target_density(self) -> float:
        return self.costs.density(self.density) if self.density is not None else 0.0


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


def kv_read_tokens(prompt_len: int, output_len: int) -> float:
    """BlendServe's memory term of one request, up to constants: KV tokens read over its decode."""
    return prompt_len * output_len + output_len * output_len / 2


def _kv_reads(s: Sample) -> float:
    return kv_read_tokens(len(s.prompt_ids), expected_len(s))


def plan_batch(seqs: list[Sample], *, sharing: bool, policy: str,
               model_cfg: Optional[ModelConfig] = None, blend: BlendOptions = BlendOptions(),
               density: Optional[DensityModel] = None) -> BatchPlan:
    """Create the shared prefixes, link samples to them and set every sample's `order`."""
    if policy not in POLICIES:
        raise ValueError(f"schedule_policy={policy!r} is not one of {', '.join(POLICIES)}")
    tree = build_prefix_tree([s.prompt_ids for s in seqs]) if sharing and seqs else None
    prefixes: list[SharedPrefix] = []
    node_seq: dict = {}
    group_of: dict = {}
    groups = 0
    if tree is not None:
        group_of = _assign_groups(tree)
        groups = len(set(group_of.values()))
        for k, node in enumerate(tree.shared):   # parents come before children
            parent = node_seq.get(node.parent)
            ps = SharedPrefix(prompt_ids=seqs[node.first].prompt_ids[:node.depth], index=-1 - k,
                              prefix=parent, members_left=node.num_leaves,
                              num_members=node.num_leaves)
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
    plan = BatchPlan(prefixes, tree, groups, group_of=group_of, node_seq=node_seq)
    order_samples(plan, seqs, policy, model_cfg=model_cfg, blend=blend, density=density)
    return plan


def order_samples(plan: BatchPlan, seqs: list[Sample], policy: str, *,
                  model_cfg: Optional[ModelConfig] = None, blend: BlendOptions = BlendOptions(),
                  density: Optional[DensityModel] = None) -> None:
    """Set the `order` of `seqs` (all or part of the plan's samples, linked to its prefixes) by
    `policy`, from their expected output lengths; blendserve also sets the plan's units."""
    if policy not in POLICIES:
        raise ValueError(f"schedule_policy={policy!r} is not one of {', '.join(POLICIES)}")
    plan.units = []
    if policy == "blendserve":
        if density is None:
            density = DensityModel.for_model(model_cfg) if model_cfg is not None else DensityModel()
        _plan_blend(plan, seqs, plan.group_of, plan.node_seq, blend, density)
    elif policy == "fifo" or plan.tree is None:
        for s in seqs:
            s.order = s.index
    else:
        _plan_batchllm(plan, seqs, plan.node_seq)


def _plan_batchllm(plan: BatchPlan, seqs: list[Sample], node_seq: dict) -> None:
    tree = plan.tree
    # Aggregates per shared node, bottom-up: prompt tokens, output tokens, tokens to compute.
    by_node: dict = {}
    for s in seqs:
        by_node.setdefault(s.prefix, []).append(s)
    agg: dict = {}
    for node in reversed(tree.shared):           # children before parents
        direct = by_node.get(node_seq[node], [])
        m = sum(_kv_reads(s) for s in direct)
        d = sum(expected_len(s) for s in direct)
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
        units.append(([s], (_kv_reads(s), expected_len(s), len(s.prompt_ids))))
    order = sorted(range(len(units)), key=lambda i: -units[i][1][1] / max(units[i][1][2], 1))
    k = 0
    for i in order:
        for s in units[i][0]:
            s.order = k
            k += 1


# -- blendserve ------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Item:
    """A node of the resource-aware tree: a cascade group's region (its own members and the groups
    nested in it) or a single request outside any shared prefix."""

    costs: Costs
    members: list = dataclasses.field(default_factory=list)   # samples of this group itself
    children: list = dataclasses.field(default_factory=list)  # nested groups' items
    decode: float = 0.0             # output tokens below (batchllm's ratio, the density-off order)
    prefill: float = 0.0            # prompt tokens computed below


def _member_costs(s: Sample) -> Costs:
    """A sample's own share: the prompt tokens below its deepest shared prefix, its share of the
    prefixes' prefill, and its decode; the KV past its cascade group's prefix, which it reads on
    its own."""
    d = expected_len(s)
    g = s.group.num_tokens if s.group is not None else 0
    return Costs(len(s.prompt_ids) - s.base + prefix_share(s) + d,
                 kv_reads(len(s.prompt_ids) - g, d))


def _block_costs(samples: list) -> Costs:
    """Members of one group (or a chunk of them): the group's prefix is read once per decode step
    while they decode (cascade attention), as long as the longest of them."""
    c = Costs()
    for s in samples:
        c.add(_member_costs(s))
    g = samples[0].group
    if g is not None:
        c.kv += g.num_tokens * max(expected_len(s) for s in samples)
    return c


def _group_items(seqs: list[Sample], group_of: dict, node_seq: dict) -> list[_Item]:
    """The root's children: one item per top-level group region, and one per request outside any
    shared prefix; a nested region hangs below the region that holds its parent node."""
    seq_node = {id(v): k for k, v in node_seq.items()}
    items: dict = {}                                # group node -> item
    for node, g in group_of.items():
        it = items.setdefault(g, _Item(Costs()))
        it.costs.tokens += node.own_len             # each shared node is computed once
        it.prefill += node.own_len
    for s in seqs:
        if s.group is not None:
            items[seq_node[id(s.group)]].members.append(s)
    roots = []
    for g, it in items.items():
        if it.members:
            it.costs.add(_block_costs(it.members))
        it.decode += sum(expected_len(s) for s in it.members)
        it.prefill += sum(len(s.prompt_ids) - s.base for s in it.members)
        if g.parent.parent is None:                 # below the root: a top-level group
            roots.append(it)
        else:
            items[group_of[g.parent]].children.append(it)

    # A group whose prefix is short next to what each member holds of its own (a template, a
    # system prompt) gains little KV from running its members together: its members are ordered
    # one by one, among all the batch's items.
    loose = []
    for g, it in list(items.items()):
        if it.members and not it.children and g.parent.parent is None:
            own = sum(len(s.prompt_ids) - g.depth + expected_len(s) for s in it.members)
            if g.depth * len(it.members) < own:
                loose.append(it)
    for it in loose:
        roots.remove(it)
        for s in it.members:
            roots.append(_Item(_member_costs(s), [s], decode=expected_len(s),
                               prefill=len(s.prompt_ids) - s.base + prefix_share(s)))

    def total(it: _Item) -> None:
        for c in it.children:
            total(c)
            it.costs.add(c.costs)
            it.decode += c.decode
            it.prefill += c.prefill

    for it in roots:
        total(it)
    for s in seqs:
        if s.group is None:
            d = expected_len(s)
            roots.append(_Item(_member_costs(s), [s], decode=d, prefill=len(s.prompt_ids)))
    return roots


def _sequence(roots: list[_Item], key, max_unit: int, model: DensityModel) -> list[Unit]:
    """The units in a depth-first walk whose every node's children (its own members' block among
    them) are sorted by `key(costs, decode, prefill)`; a block larger than `max_unit` is cut
    into chunks of members sorted by density."""
    out: list[Unit] = []

    def block(samples: list) -> None:
        if len(samples) > max_unit:
            samples = sorted(samples, key=lambda s: _member_costs(s).density(model))
        for i in range(0, len(samples), max_unit):
            chunk = samples[i:i + max_unit]
            c = _block_costs(chunk)
            out.append(Unit(chunk, c, c.density(model)))

    def walk(items: list[_Item]) -> None:
        entries = []                                # (sort key, members or None, nested items)
        for it in items:
            if it.members:
                if it.children:
                    c = _block_costs(it.members)
                    d = sum(expected_len(s) for s in it.members)
                    p = sum(len(s.prompt_ids) - s.base for s in it.members)
                else:
                    c, d, p = it.costs, it.decode, it.prefill
                entries.append((key(c, d, p), it.members, None))
            if it.children:
                sub = Costs()
                for x in it.children:
                    sub.add(x.costs)
                entries.append((key(sub, sum(x.decode for x in it.children),
                                    sum(x.prefill for x in it.children)), None, it.children))
        entries.sort(key=lambda e: e[0])
        for _, members, children in entries:
            if members is not None:
                block(members)
            else:
                walk(children)

    walk(roots)
    return out


def _dual_scan(units: list[Unit], target: float, model: DensityModel) -> list[int]:
    """Indices of `units` (memory-heavy first) taken from both ends: from the compute-heavy end
    while the mix admitted so far is below the target density, else from the memory-heavy end."""
    lo, hi = 0, len(units) - 1
    acc = Costs()
    order = []
    while lo <= hi:
        if acc.kv > 0 and acc.density(model) < target:
            i, hi = hi, hi - 1
        else:
            i, lo = lo, lo + 1
        order.append(i)
        acc.add(units[i].costs)
    return order


def _plan_blend(plan: BatchPlan, seqs: list[Sample], group_of: dict, node_seq: dict,
                opt: BlendOptions, model: DensityModel) -> None:
    roots = _group_items(seqs, group_of, node_seq)
    total = Costs()
    for it in roots:
        total.add(it.costs)
    target = total.density(model)

    def key(c: Costs, decode: float, prefill: float) -> float:
        # Memory-heavy first: ascending density, or (switched off) batchllm's decode per computed
        # prompt token, highest first.
        return c.density(model) if opt.density_order else -decode / max(prefill, 1)

    max_unit = max(MIN_UNIT_SPLIT, int(len(seqs) * MAX_UNIT_SHARE))
    units = _sequence(roots, key, max_unit, model)
    order = _dual_scan(units, target, model) if opt.dual_scan else range(len(units))
    plan.units = [units[i] for i in order]
    plan.costs = total
    plan.density = model
    k = 0
    for u in plan.units:
        for s in u.samples:
            s.order = k
            k += 1
