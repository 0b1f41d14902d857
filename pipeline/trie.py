"""Label sets whose labels share leading tokens (aisles, taxonomy paths), scored exactly and fast.

The trie scorer (:func:`trie_log_likelihoods`) gives the same log-likelihoods as the full scorer
(``pipeline.scoring.label_log_likelihoods``): one forward pass over the prompt, then one over
the labels' token trie from the prompt's cached keys/values, with a tree attention mask so that
every shared prefix is computed once per product (:class:`LabelTrie`).

Labeling searches instead of scoring every label (:func:`trie_search_log_probs`): the top label
stays exact and the probabilities stay within a stated tolerance (``eval.trie_tolerance``), in
the shipped space (blend and temperature), from kept keys and values (:class:`NodeStore`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import DynamicCache

from pipeline.passes import batches_by_length, head_logits, label_token_ids, pad_left
from pipeline.progress import progress_bar

NODES_PER_PROJECTION = 32


@dataclass
class LabelTrie:
    """The labels' completion token sequences (each ending in EOS) as a trie.

    Inner nodes are the proper, non-empty prefixes: the tokens fed after the prompt, each seeing
    the prompt and its own ancestors. Edges are (the node a token follows, that token); a label's
    log-likelihood is the sum of the log-probabilities of the edges on its path. Node 0 of the
    edge sources is the prompt's last position, node k + 1 the inner node k.
    """

    tokens: list[int]
    parents: list[int]
    """Parent inner node of each inner node, -1 under the prompt."""
    depths: list[int]
    edge_sources: list[int]
    edge_tokens: list[int]
    paths: torch.Tensor
    """(edges, labels): 1 where the edge is on the label's path."""
    label_nodes: list[list[int]]
    """Each label's inner nodes, root first: scoring a label exactly needs the model's output at each."""

    @classmethod
    def build(cls, sequences: list[list[int]]) -> LabelTrie:
        inner: dict[tuple[int, ...], int] = {}
        tokens, parents, depths = [], [], []
        edges: dict[tuple[int, int], int] = {}
        on_path: list[tuple[int, int]] = []
        label_nodes: list[list[int]] = []
        for label, sequence in enumerate(sequences):
            for k in range(len(sequence)):
                source = 0 if k == 0 else inner[tuple(sequence[:k])] + 1
                edge = edges.setdefault((source, sequence[k]), len(edges))
                on_path.append((edge, label))
                prefix = tuple(sequence[: k + 1])
                if k + 1 < len(sequence) and prefix not in inner:
                    inner[prefix] = len(tokens)
                    tokens.append(sequence[k])
                    parents.append(source - 1)
                    depths.append(k + 1)
            label_nodes.append([inner[tuple(sequence[: k + 1])] for k in range(len(sequence) - 1)])
        paths = torch.zeros(len(edges), len(sequences))
        for edge, label in on_path:
            paths[edge, label] = 1
        sources, edge_tokens = zip(*edges) if edges else ((), ())
        return cls(tokens, parents, depths, list(sources), list(edge_tokens), paths, label_nodes)

    @cached_property
    def visible(self) -> torch.Tensor:
        """(inner, inner) bool: node j is node i or one of its ancestors."""
        n = len(self.tokens)
        visible = torch.eye(n, dtype=torch.bool)
        for i, parent in enumerate(self.parents):  # parents come before their children
            if parent >= 0:
                visible[i] |= visible[parent]
        return visible

    @cached_property
    def ancestors(self) -> list[list[int]]:
        """Each inner node's inner ancestors, root first."""
        out: list[list[int]] = []
        for parent in self.parents:  # parents come before their children
            out.append([] if parent < 0 else out[parent] + [parent])
        return out

    @cached_property
    def has_inner_children(self) -> list[bool]:
        """Whether a node is the context of another inner node (its keys and values are needed again)."""
        out = [False] * len(self.tokens)
        for parent in self.parents:
            if parent >= 0:
                out[parent] = True
        return out

    @cached_property
    def child_edges(self) -> list[list[int]]:
        """The edges leaving each inner node (what the model's output at that node scores)."""
        children: list[list[int]] = [[] for _ in self.tokens]
        for edge, source in enumerate(self.edge_sources):
            if source > 0:
                children[source - 1].append(edge)
        return children


def _cached_prompt_pass(model, tokenizer, prompts: list[list[int]], device):
    """Left-padded prompts through the model, keeping their keys/values for the label trie:
    (attention mask, cache, log-probabilities of the token after each prompt)."""
    input_ids, attention, positions = pad_left(prompts, tokenizer.pad_token_id, device)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=1,
                use_cache=True)
    return attention, out.cache, out.logits[:, -1].float().log_softmax(-1)


def _tree_pass(model, input_ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor,
               cache) -> torch.Tensor:
    """Trie nodes after the cached prompts: ``allowed`` (rows, nodes, cached + nodes) says what
    each node attends to (its prompt and its ancestors). Returns the decoder's hidden states."""
    decoder = model.get_decoder()
    mask = torch.zeros(allowed.shape, dtype=next(decoder.parameters()).dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(mask.dtype).min)
    return decoder(input_ids=input_ids, attention_mask=mask[:, None], position_ids=positions, cache=cache,
                   use_cache=True).last_hidden_state


@torch.inference_mode()
def trie_log_likelihoods(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 64,
                         progress: bool = True) -> torch.Tensor:
    """What :func:`label_log_likelihoods` computes, (n_prompts, n_labels), with each shared label
    prefix computed once per product: the prompt pass's cached keys/values, then one pass over
    the trie's inner nodes under a tree mask (prompt + ancestors), positions continuing the prompt.

    Only causal LMs that are a decoder, then the output embeddings (:func:`head_logits`).
    """
    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    device = next(model.parameters()).device
    n_inner = len(trie.tokens)
    tree_ids = torch.tensor(trie.tokens, device=device)
    depths = torch.tensor(trie.depths, device=device)
    sources = torch.tensor(trie.edge_sources, device=device)
    edge_tokens = torch.tensor(trie.edge_tokens, device=device)
    paths = trie.paths.to(device)
    visible = trie.visible.to(device)
    per_batch = max(1, batch_size * 16 // (n_inner + 16))  # tree tokens dominate: keep a batch's tokens bounded
    out = torch.empty((len(prompts), len(labels)))
    with progress_bar(len(prompts), "scoring (trie)", "product", disable=not progress) as bar:
        for batch in batches_by_length([len(p) for p in prompts], per_batch):
            attention, cache, next_token = _cached_prompt_pass(model, tokenizer, [prompts[i] for i in batch], device)
            rows, width = attention.shape
            lengths = attention.sum(1)
            allowed = torch.cat([attention.bool()[:, None, :].expand(rows, n_inner, width),
                                 visible[None].expand(rows, n_inner, n_inner)], dim=2)
            hidden = _tree_pass(model, tree_ids.expand(rows, n_inner), allowed,
                                lengths[:, None] + depths[None, :] - 1, cache)
            edge_log_probs = torch.empty((rows, len(sources)), device=device)
            root = sources == 0
            edge_log_probs[:, root] = next_token[:, edge_tokens[root]]
            for start in range(0, n_inner, NODES_PER_PROJECTION):  # bounds memory at (rows, nodes, vocab)
                here = (sources > start) & (sources <= start + NODES_PER_PROJECTION)
                log_probs = head_logits(model, hidden[:, start : start + NODES_PER_PROJECTION]).float().log_softmax(-1)
                edge_log_probs[:, here] = log_probs[:, sources[here] - 1 - start, edge_tokens[here]]
            out[batch] = (edge_log_probs @ paths).cpu()
            bar.update(len(batch))
    return out


@dataclass
class SearchSpace:
    """Where :func:`trie_search_log_probs` ranks labels: the shipped score of label j for a product
    is (its log-likelihood + ``offsets[j]``) / ``temperature`` (``pipeline.calibrate``: the blend
    with the lexical model, then the temperature), renormalised over the label set."""

    offsets: torch.Tensor
    """(prompts, labels), zeros for the adapter alone."""
    temperature: float
    tolerance: float
    """Probability mass per product that may stay unscored (``eval.trie_tolerance``): every
    probability is within it."""


SEARCH_LABELS_PER_ROUND = 64
"""Labels one product takes further down their paths in one round, at most."""
POSITIONS_PER_PROJECTION = 512
"""Node outputs projected onto the vocabulary at once: bounds memory at (positions, vocab)."""


def search_certified(scores: torch.Tensor, scored: torch.Tensor, log_tolerance: float) -> torch.Tensor:
    """Rows whose answer the unscored labels can no longer change: the best exact score is at least
    every unscored label's bound, and the unscored bounds together hold at most the tolerance
    relative to the scored mass (so every probability is within it)."""
    exact = scores.masked_fill(~scored, -torch.inf)
    bound = scores.masked_fill(scored, -torch.inf)
    return ((bound.max(-1).values <= exact.max(-1).values)
            & (bound.logsumexp(-1) <= log_tolerance + exact.logsumexp(-1)))


def search_candidates(scores: torch.Tensor, scored: torch.Tensor, log_tolerance: float) -> list[list[int]]:
    """Per row, the unscored labels to take further: the fewest of the highest bounds
    after which the rest could hold no more than the tolerance, were each candidate's bound its
    score. A candidate's bound only falls as its path is computed, so taking more than these at
    once computes nodes the search may never need (it did: results/README.md)."""
    bound = scores.masked_fill(scored, -torch.inf)
    values, order = bound.sort(-1, descending=True)
    known = scores.masked_fill(~scored, -torch.inf).logsumexp(-1, keepdim=True)
    head = torch.logaddexp(known, values.logcumsumexp(-1))  # [k - 1]: scored + the first k bounds
    rest = values.flip(-1).logcumsumexp(-1).flip(-1)  # [k]: the bounds from k on
    rest = torch.cat([rest[:, 1:], torch.full_like(rest[:, :1], -torch.inf)], 1)  # [k - 1]: after taking k
    enough = (rest <= log_tolerance + head).float().argmax(-1) + 1
    counts = torch.minimum(torch.minimum(enough, (~scored).sum(-1)), torch.tensor(SEARCH_LABELS_PER_ROUND))
    return [order[r, : int(k)].tolist() for r, k in enumerate(counts)]


@torch.inference_mode()
def trie_search_log_probs(model, tokenizer, prompts: list[list[int]], labels: list[str], space: SearchSpace,
                          batch_size: int = 64, progress: bool = True, stats: dict[str, float] | None = None,
                          nodes_per_label: int | None = None) -> torch.Tensor:
    """Shipped log-probabilities over the label set, (n_prompts, n_labels), exact for the labels
    that can matter and -inf for the rest, which together hold at most ``space.tolerance``.

    A best-first search over the label trie, in the shipped space: a label's log-likelihood is a
    sum of log-probabilities (each <= 0), so the part computed so far bounds it from above. The
    prompt pass gives every label's first token; then, in rounds, each product takes the labels
    whose bounds could still hold mass (:func:`search_candidates`) down their paths, and every
    edge leaving a computed node tightens the bounds of the labels below it, until
    :func:`search_certified`. No node is computed twice: a round's nodes see the prompt's and
    their ancestors' kept keys and values (:class:`NodeStore`), products taking similar numbers
    of nodes in one pass (:func:`_similar_sizes`). A round takes each candidate ``nodes_per_label``
    nodes further (None: to its end): one at a time never follows a label deeper than its bound
    needs, but whole paths cost the aisles 1% more nodes in a fifth of the rounds, and were
    faster (results/README.md). The top label is the exact scorer's. ``stats``, when given,
    receives counts per product.
    """
    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    device = next(model.parameters()).device
    paths = trie.paths.to(device)
    path_edges = paths.sum(0)
    root = torch.tensor([source == 0 for source in trie.edge_sources], device=device)
    root_tokens = torch.tensor(trie.edge_tokens, device=device)[root]
    log_tolerance = math.log(space.tolerance) if space.tolerance > 0 else -math.inf
    counts = {"products": 0, "rounds": 0, "passes": 0, "labels_scored": 0, "nodes": 0, "padded_nodes": 0}
    out = torch.empty((len(prompts), len(labels)))
    with progress_bar(len(prompts), "scoring (trie search)", "product", disable=not progress) as bar:
        for batch in batches_by_length([len(p) for p in prompts], batch_size):
            attention, cache, next_token = _cached_prompt_pass(model, tokenizer, [prompts[i] for i in batch], device)
            rows = len(batch)
            store = NodeStore(rows, trie)
            edge_log_probs = torch.zeros((rows, len(trie.edge_sources)), device=device)
            edge_known = torch.zeros(edge_log_probs.shape, dtype=torch.bool, device=device)
            edge_log_probs[:, root] = next_token[:, root_tokens]
            edge_known[:, root] = True
            offsets = space.offsets[batch].to(device)
            while True:
                scores = (edge_log_probs @ paths + offsets) / space.temperature  # bounds; exact where scored
                scored = (edge_known.float() @ paths) == path_edges
                pending = (~search_certified(scores, scored, log_tolerance)).nonzero().squeeze(1).cpu()
                if not len(pending):
                    break
                chosen = search_candidates(scores[pending].cpu(), scored[pending].cpu(), log_tolerance)
                nodes = [sorted({node for label in labels_r
                                 for node in store.next_nodes(int(r), trie.label_nodes[label], nodes_per_label)})
                         for r, labels_r in zip(pending, chosen)]
                for group in _similar_sizes([len(n) for n in nodes]):
                    at_rows, edges, values = _expand(model, trie, cache, store, pending[group].tolist(),
                                                     [nodes[k] for k in group], attention)
                    edge_log_probs[at_rows, edges] = values
                    edge_known[at_rows, edges] = True
                    counts["passes"] += 1
                    counts["padded_nodes"] += len(group) * max(len(nodes[k]) for k in group)
                counts["rounds"] += 1
                counts["nodes"] += sum(map(len, nodes))
            out[batch] = scores.masked_fill(~scored, -torch.inf).log_softmax(-1).cpu()
            counts["products"] += rows
            counts["labels_scored"] += int(scored.sum())
            bar.update(rows)
    if stats is not None:
        n = max(1, counts["products"])
        stats.update(products=counts["products"], rounds=counts["rounds"], passes=counts["passes"],
                     labels_scored_per_product=round(counts["labels_scored"] / n, 2),
                     nodes_per_product=round(counts["nodes"] / n, 2),
                     padded_nodes_per_product=round(counts["padded_nodes"] / n, 2))
    return out


def _similar_sizes(sizes: list[int], slack: float = 1.25) -> list[list[int]]:
    """Indices grouped by size, each group's largest at most ``slack`` x its smallest (+ 2): a
    pass pads every row to its group's largest, and one product with 60 nodes would otherwise
    make 63 others pay for 60; a pass per size would pay each pass's copies of the cache."""
    groups: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=sizes.__getitem__):
        if groups and sizes[i] <= slack * sizes[groups[-1][0]] + 2:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class NodeStore:
    """The keys and values of the trie nodes a search has computed, per batch row, so that a later
    round takes a path further without recomputing its ancestors. Only nodes that are
    another inner node's context are kept (a label's last node before EOS never is)."""

    def __init__(self, rows: int, trie: LabelTrie) -> None:
        self.kept = trie.has_inner_children
        self.computed = torch.zeros((rows, len(trie.tokens)), dtype=torch.bool)
        self.slot = torch.full((rows, len(trie.tokens)), -1, dtype=torch.long)
        """Where a kept node's keys and values sit in :attr:`keys` / :attr:`values` (-1: not kept)."""
        self.filled = [0] * rows
        self.keys: list[torch.Tensor] = []
        """Per layer, (rows, key-value heads, capacity, head dim)."""
        self.values: list[torch.Tensor] = []

    def next_nodes(self, row: int, path: list[int], count: int | None) -> list[int]:
        """The first ``count`` (None: all) nodes of ``path`` (an unscored label's inner nodes, root
        first) not yet computed for ``row``: the first one's ancestors are all computed."""
        missing = (~self.computed[row, path]).nonzero().squeeze(1).tolist()
        return [path[k] for k in missing[:count]]

    def gather(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) at ``slots`` (rows x context) of ``rows``: (rows, heads, context, dim)."""
        keys, values = self.keys[layer], self.values[layer]
        index = (rows.to(keys.device)[:, None], slice(None), slots.to(keys.device))
        return keys[index].transpose(1, 2), values[index].transpose(1, 2)

    def put(self, rows: list[int], nodes: list[list[int]], cache, offset: int) -> None:
        """Keep what a pass computed: ``nodes[g]`` of batch row ``rows[g]`` sit at columns
        ``offset + j`` of the pass's ``cache`` entry ``g``."""
        kept = []
        for g, (row, row_nodes) in enumerate(zip(rows, nodes)):
            for j, node in enumerate(row_nodes):
                self.computed[row, node] = True
                if self.kept[node]:
                    self.slot[row, node] = self.filled[row]
                    kept.append((g, offset + j, row, self.filled[row]))
                    self.filled[row] += 1
        if not kept:
            return
        self._reserve(max(self.filled), cache)
        at, columns, kept_rows, slots = (torch.tensor(x, device=cache.layers[0].keys.device) for x in zip(*kept))
        for layer, state in enumerate(cache.layers):
            self.keys[layer][kept_rows, :, slots] = state.keys[at, :, columns]
            self.values[layer][kept_rows, :, slots] = state.values[at, :, columns]

    def _reserve(self, capacity: int, cache) -> None:
        """Grow the store to ``capacity`` slots (doubling, so that growth is rare)."""
        have = self.keys[0].shape[2] if self.keys else 0
        if capacity <= have:
            return
        grown = max(capacity, 2 * have, 8)
        for layer, state in enumerate(cache.layers):
            shape = (len(self.filled), state.keys.shape[1], grown, state.keys.shape[3])
            keys, values = state.keys.new_zeros(shape), state.values.new_zeros(shape)
            if have:
                keys[:, :, :have], values[:, :, :have] = self.keys[layer], self.values[layer]
                self.keys[layer], self.values[layer] = keys, values
            else:
                self.keys.append(keys)
                self.values.append(values)


def _expand(model, trie: LabelTrie, prompt_cache, store: NodeStore, rows: list[int], nodes: list[list[int]],
            attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's output at each of ``nodes[g]`` (nodes whose ancestors are each in ``store`` or
    in ``nodes[g]``) after the prompt of batch row ``rows[g]``: each node sees the prompt, its
    ancestors (kept keys and values, or this pass's) and itself (rows with fewer nodes are
    padded). Keeps the new nodes' keys and values in ``store``. Returns, for every edge leaving
    those nodes, (batch row, edge, log-probability)."""
    device = attention.device
    width, count = attention.shape[1], max(map(len, nodes))
    context = [sorted({a for node in row_nodes for a in trie.ancestors[node]} - set(row_nodes)) for row_nodes in nodes]
    known = max(map(len, context))
    slots = torch.zeros((len(rows), known), dtype=torch.long)
    allowed = torch.zeros((len(rows), count, width + known + count), dtype=torch.bool, device=device)
    batch_rows = torch.tensor(rows, device=device)
    allowed[:, :, :width] = attention.bool()[batch_rows][:, None, :]
    allowed[:, :, width + known:] = torch.eye(count, dtype=torch.bool, device=device)  # each node (or pad) itself
    input_ids = torch.zeros((len(rows), count), dtype=torch.long, device=device)
    depths = torch.ones((len(rows), count), dtype=torch.long, device=device)
    for g, (row, row_nodes) in enumerate(zip(rows, nodes)):
        slots[g, : len(context[g])] = store.slot[row, context[g]]
        column = {a: width + k for k, a in enumerate(context[g])}
        column.update({node: width + known + j for j, node in enumerate(row_nodes)})
        input_ids[g, : len(row_nodes)] = torch.tensor([trie.tokens[n] for n in row_nodes])
        depths[g, : len(row_nodes)] = torch.tensor([trie.depths[n] for n in row_nodes])
        for j, node in enumerate(row_nodes):
            allowed[g, j, [column[a] for a in trie.ancestors[node]]] = True
    cache = DynamicCache(config=model.config)  # the rows' prompts and the nodes' ancestors
    for layer, state in enumerate(prompt_cache.layers):
        keys, values = state.keys[batch_rows], state.values[batch_rows]
        if known:
            kept_keys, kept_values = store.gather(layer, batch_rows, slots)
            keys, values = torch.cat([keys, kept_keys], 2), torch.cat([values, kept_values], 2)
        cache.update(keys, values, layer)
    hidden = _tree_pass(model, input_ids, allowed, attention.sum(1)[batch_rows, None] + depths - 1, cache)
    store.put(rows, nodes, cache, width + known)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # position g * count + j
    where = [(g * count + j, edge) for g, row_nodes in enumerate(nodes) for j, node in enumerate(row_nodes)
             for edge in trie.child_edges[node]]
    at, edges = (torch.tensor(x, device=device) for x in zip(*where))
    positions, inverse = at.unique(return_inverse=True)  # real nodes only, not the padding
    states = hidden[positions]
    tokens = torch.tensor(trie.edge_tokens, device=device)[edges]
    values = torch.empty(len(edges), device=device)
    for start in range(0, len(positions), POSITIONS_PER_PROJECTION):
        logits = head_logits(model, states[start : start + POSITIONS_PER_PROJECTION]).float()
        here = (inverse >= start) & (inverse < start + POSITIONS_PER_PROJECTION)
        local = inverse[here] - start
        values[here] = logits[local, tokens[here]] - logits.logsumexp(-1)[local]
    return batch_rows[at // count], edges, values
