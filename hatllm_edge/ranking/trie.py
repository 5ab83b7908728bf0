"""The prefix tree of catalog titles' token ids: which tokens may follow a partial title,
and which catalog items lie under a node (beam search, renormalised steps, training's
masked-softmax loss)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.prompt import PromptBuilder


@dataclass
class TitleTrie:
    """Prefix tree of every catalog title followed by the end marker.

    Node 0 is the root; ``children[n]`` maps (token, is_title) to the next node, so a token
    that ends one title's end marker and continues another title gets two nodes (their
    segments differ); ``items[n]`` lists the catalog indices whose full sequence ends at node n
    (duplicate titles share a leaf); ``is_title[n]`` says whether the token leading to n belongs
    to a title (the answer's segment) or to the end marker (segment 0).
    """

    children: list[dict[tuple[int, bool], int]] = field(default_factory=lambda: [{}])
    items: list[list[int]] = field(default_factory=lambda: [[]])
    is_title: list[bool] = field(default_factory=lambda: [False])
    under: list[list[int]] = field(default_factory=lambda: [[]])  # catalog indices whose sequence passes node n
    paths: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per title: the node before each of its tokens
    _expanded: dict[int, "Children"] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, catalog: Catalog, prompts: PromptBuilder) -> "TitleTrie":
        trie = cls()
        end = prompts.end_ids
        for index, title in enumerate(catalog.titles):
            title_ids = prompts.title_ids(title)
            node, path = 0, [0]
            trie.under[0].append(index)
            for depth, token in enumerate(title_ids + end):
                key = (token, depth < len(title_ids))
                nxt = trie.children[node].get(key)
                if nxt is None:
                    nxt = len(trie.children)
                    trie.children[node][key] = nxt
                    trie.children.append({})
                    trie.items.append([])
                    trie.is_title.append(key[1])
                    trie.under.append([])
                node = nxt
                trie.under[node].append(index)
                path.append(node)
            trie.items[node].append(index)
            trie.paths[title] = tuple(path[:-1])
        return trie

    def expand(self, node: int) -> "Children":
        """The children of ``node`` as arrays (built once per node)."""
        out = self._expanded.get(node)
        if out is None:
            keys = list(self.children[node].items())
            nodes = np.asarray([c for _, c in keys], dtype=np.int64)
            tokens = np.asarray([t for (t, _), _ in keys], dtype=np.int64)
            sizes = [len(self.under[c]) for c in nodes]
            out = Children(tokens, nodes, np.unique(tokens),
                           np.asarray([i for c in nodes for i in self.under[c]], dtype=np.int64),
                           np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if keys else np.zeros(0, np.int64))
            self._expanded[node] = out
        return out


@dataclass(frozen=True)
class Children:
    """A trie node's children: what one beam-search step can append."""

    tokens: np.ndarray  # [C] the token leading to each child
    nodes: np.ndarray  # [C] the child nodes
    allowed: np.ndarray  # the distinct tokens: what a renormalised step normalises over
    items: np.ndarray  # catalog indices under the children, child after child
    starts: np.ndarray  # [C] where each child's items begin in ``items``
