"""An is-a hierarchy (a tree, or a forest of trees) over class labels, for ontology recovery.

Built from (child, parent) edges (:meth:`Hierarchy.from_edges`) or read from an is-a file
(:meth:`Hierarchy.read`): one ``child<TAB>parent`` per line, ``#`` starts a comment, blank
lines are skipped. Names may hold spaces (only the tab separates). Construction checks the
edges: a child with two different parents, or a cycle (named: ``a -> b -> a``, each arrow
"is a"), raises InputError. A forest (several roots) is allowed; two labels in different
trees have no common hypernym (None / -1).

Definitions (node = any name in the edges; the root(s) have no parent):
- leaf: a node without children; internal node: a node with at least one child.
- depth(v): edges from v up to its root (a root has depth 0).
- height(v): the longest path from v down to a leaf of its subtree (a leaf: 0).
- lca(a, b): the deepest node that is an ancestor-or-self of both; lch(S): the lowest
  common hypernym of a set, lca folded over the set (iterated pairwise).

Queries work on integer node ids (``hierarchy.index[name]``) with numpy arrays, so that
thousands of latents cost a few vectorized passes: the LCA is binary lifting
(O(log depth) per pair); "is u under v" is one comparison of preorder intervals
(``tin[v] <= tin[u] < tout[v]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError


def _cycle_text(start: str, parent: dict[str, str]) -> str:
    """Follow parents from ``start`` (which never reaches a root) to the first repeat:
    "a -> b -> a" (the cycle only, without the path that leads into it)."""
    seen: dict[str, int] = {}
    path = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = parent[node]
    cycle = path[seen[node]:] + [node]
    return " -> ".join(cycle)


class Hierarchy:
    """A validated is-a forest. Attributes (V nodes, ids 0..V-1 in first-seen order):

    names:  list[str] [V]; index: dict name -> id
    parent: int64 [V], -1 for a root;  children: list[list[int]] [V]
    depth, height: int64 [V];  tin, tout: int64 [V] preorder interval of each subtree
    roots: list[int];  is_leaf: bool [V];  leaves, internal: int64 arrays of ids
    display: dict name -> display name (e.g. WordNet lemmas), optional; source: where from
    """

    def __init__(self, edges: Iterable[tuple[str, str]], *, display: dict[str, str] | None = None,
                 source: str = "edges"):
        parent_of: dict[str, str] = {}
        order: dict[str, None] = {}  # names in first-seen order
        for number, edge in enumerate(edges, 1):
            if not (isinstance(edge, (tuple, list)) and len(edge) == 2):
                raise InputError(f"{source}: edge {number} is {edge!r}; each edge is a (child, parent) pair of names")
            child, parent = (str(e).strip() for e in edge)
            if not child or not parent:
                raise InputError(f"{source}: edge {number} ({edge!r}) has an empty name; give both the child "
                                 "and its parent")
            if child == parent:
                raise InputError(f"{source}: a cycle: {child} -> {child} (a node is its own parent); drop that "
                                 "edge")
            known = parent_of.get(child)
            if known is not None and known != parent:
                raise InputError(f"{source}: {child!r} has two parents, {known!r} and {parent!r}; a hierarchy here "
                                 "is a tree: keep one parent per child (e.g. WordNet's first hypernym)")
            parent_of[child] = parent
            order.setdefault(child)
            order.setdefault(parent)
        if not order:
            raise InputError(f"{source}: no edges; give at least one child<TAB>parent line")
        self.source = source
        self.names: list[str] = list(order)
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        v = len(self.names)
        self.parent = np.full(v, -1, dtype=np.int64)
        for child, parent in parent_of.items():
            self.parent[self.index[child]] = self.index[parent]
        self.children: list[list[int]] = [[] for _ in range(v)]
        for child in range(v):
            if self.parent[child] >= 0:
                self.children[int(self.parent[child])].append(child)
        self.roots = [i for i in range(v) if self.parent[i] < 0]
        self._layout(parent_of)
        self.display = dict(display or {})

    # ----- construction ---------------------------------------------------------------------
    def _layout(self, parent_of: dict[str, str]) -> None:
        """Depth, preorder intervals and heights by one iterative walk from the roots; a
        node the walk never reaches sits on a cycle (every node has one parent)."""
        v = len(self.names)
        depth = np.full(v, -1, dtype=np.int64)
        tin = np.zeros(v, dtype=np.int64)
        tout = np.zeros(v, dtype=np.int64)
        post: list[int] = []
        clock = 0
        for root in self.roots:
            depth[root] = 0
            stack = [(root, False)]
            while stack:
                node, done = stack.pop()
                if done:
                    tout[node] = clock
                    post.append(node)
                    continue
                tin[node] = clock
                clock += 1
                stack.append((node, True))
                for child in reversed(self.children[node]):
                    depth[child] = depth[node] + 1
                    stack.append((child, False))
        unreached = np.flatnonzero(depth < 0)
        if unreached.size:
            cycle = _cycle_text(self.names[int(unreached[0])], parent_of)
            raise InputError(f"{self.source}: a cycle: {cycle} (each arrow: child -> parent); remove one of its edges "
                             "so that every node leads up to a root")
        height = np.zeros(v, dtype=np.int64)
        for node in post:  # children before their parent
            if self.children[node]:
                height[node] = 1 + max(int(height[c]) for c in self.children[node])
        self.depth, self.tin, self.tout, self.height = depth, tin, tout, height
        self.is_leaf = np.array([not c for c in self.children], dtype=bool)
        self.leaves = np.flatnonzero(self.is_leaf)
        self.internal = np.flatnonzero(~self.is_leaf)
        # binary lifting: up[j][u] = the 2^j-th ancestor of u (a root points at itself)
        levels = max(1, int(depth.max()).bit_length())
        up = np.where(self.parent < 0, np.arange(v), self.parent)
        self._up = [up]
        for _ in range(1, levels):
            self._up.append(self._up[-1][self._up[-1]])
        self._root_of = self.ancestor_at(np.arange(v), np.zeros(v, dtype=np.int64))

    @classmethod
    def from_edges(cls, edges: Iterable[tuple[str, str]], *, display: dict[str, str] | None = None,
                   source: str = "edges") -> "Hierarchy":
        return cls(edges, display=display, source=source)

    @classmethod
    def read(cls, path: str | Path, *, display: dict[str, str] | None = None) -> "Hierarchy":
        """An is-a file: ``child<TAB>parent`` per line; ``#`` to the end of a line is a
        comment; blank lines are skipped. InputError names the file and line of a bad one."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read the is-a file ({type(err).__name__}: {err}); pass a UTF-8 text "
                             "file of child<TAB>parent lines") from err
        edges = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise InputError(f"{path}:{number}: {raw!r} is not 'child<TAB>parent' (exactly two names separated "
                                 "by one tab); fix that line or comment it out with '#'")
            edges.append((fields[0], fields[1]))
        return cls(edges, display=display, source=str(path))

    # ----- names ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def name(self, node: int) -> str | None:
        return None if node < 0 else self.names[node]

    def label(self, node: int) -> str | None:
        """The display name of a node id (its name when none was given); None for -1."""
        if node < 0:
            return None
        name = self.names[node]
        return self.display.get(name, name)

    def ids(self, labels: Sequence[str]) -> np.ndarray:
        """Names -> int64 ids [n]; InputError naming the unknown ones (and the fix)."""
        labels = [str(label) for label in labels]
        unknown = sorted({label for label in labels if label not in self.index})
        if unknown:
            shown = ", ".join(map(repr, unknown[:8])) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise InputError(f"{len(unknown)} label(s) are not in the hierarchy ({self.source}): {shown}; add a "
                             "'label<TAB>parent' line for each to the is-a file, or fix the labels")
        return np.array([self.index[label] for label in labels], dtype=np.int64)

    # ----- structure -----------------------------------------------------------------------
    def ancestor_at(self, nodes: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """The ancestor-or-self of each node at ``depth`` (<= its own depth), vectorized."""
        nodes = np.asarray(nodes, dtype=np.int64).copy()
        lift = self.depth[nodes] - np.asarray(depth, dtype=np.int64)
        for j, up in enumerate(self._up):
            move = ((lift >> j) & 1).astype(bool)
            nodes[move] = up[nodes[move]]
        return nodes

    def lca_ids(self, a, b) -> np.ndarray:
        """Lowest common ancestor-or-self of id arrays a, b (same shape) -> int64 ids, -1
        where they lie in different trees. -1 in a or b propagates."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        shape = np.broadcast_shapes(a.shape, b.shape)
        a, b = np.broadcast_to(a, shape).ravel(), np.broadcast_to(b, shape).ravel()
        out = np.full(a.shape, -1, dtype=np.int64)
        valid = (a >= 0) & (b >= 0)
        valid[valid] = self._root_of[a[valid]] == self._root_of[b[valid]]
        x, y = a[valid], b[valid]
        d = np.minimum(self.depth[x], self.depth[y])
        x, y = self.ancestor_at(x, d), self.ancestor_at(y, d)
        for up in reversed(self._up):  # lift both while their ancestors differ
            differ = up[x] != up[y]
            x = np.where(differ, up[x], x)
            y = np.where(differ, up[y], y)
        out[valid] = np.where(x == y, x, self._up[0][x])
        return out.reshape(shape)

    def lca(self, a: str, b: str) -> str | None:
        """The lowest common hypernym (ancestor-or-self) of two names; None across trees."""
        return self.name(int(self.lca_ids(self.ids([a]), self.ids([b]))[0]))

    def lch(self, labels: Sequence[str]) -> str | None:
        """The lowest common hypernym of a set of names: lca folded pairwise over them;
        None when they span several trees. InputError for an empty set."""
        ids = self.ids(labels)
        if ids.size == 0:
            raise InputError("lch of an empty set of labels is undefined; pass at least one label")
        node = ids[0]
        for other in ids[1:]:
            node = self.lca_ids(node, other)
        return self.name(int(node))

    def lch_rows(self, label_ids: np.ndarray) -> np.ndarray:
        """label_ids int64 [K, N] -> int64 [K]: the LCH of each row's labels (-1: several
        trees). The LCA of a set = the LCA of its first and last member in preorder (every
        subtree is a preorder interval), so one pair per row."""
        label_ids = np.asarray(label_ids, dtype=np.int64)
        order = self.tin[label_ids]
        rows = np.arange(label_ids.shape[0])
        first = label_ids[rows, order.argmin(1)]
        last = label_ids[rows, order.argmax(1)]
        return self.lca_ids(first, last)

    def deepest_holding(self, label_ids: np.ndarray, m: int) -> np.ndarray:
        """label_ids int64 [K, N], 1 <= m <= N -> int64 [K]: per row, the deepest node whose
        subtree holds at least m of the row's N labels (counted with repeats), -1 when none
        does (a forest). Unique when m > N / 2 (two disjoint subtrees cannot both hold more
        than half). m = N gives the LCH of the row.

        Why windows: the labels under a node are a run of the row sorted by preorder; a
        node holding >= m of them holds some m consecutive ones, whose LCA (first and last)
        lies under it and holds them too. So the answer is the deepest window LCA.
        """
        label_ids = np.asarray(label_ids, dtype=np.int64)
        k, n = label_ids.shape
        if not 1 <= m <= n:
            raise InputError(f"deepest_holding: m={m} must be in 1..{n} (the labels per row)")
        order = np.argsort(self.tin[label_ids], axis=1, kind="stable")
        ranked = np.take_along_axis(label_ids, order, axis=1)
        windows = n - m + 1
        first = ranked[:, :windows]
        last = ranked[:, m - 1:]
        nodes = self.lca_ids(first, last)  # [K, windows]
        score = np.where(nodes >= 0, self.depth[np.maximum(nodes, 0)], -1)
        best = score.argmax(1)
        return nodes[np.arange(k), best]

    def under(self, nodes: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
        """nodes int64 [K], label_ids int64 [K, N] -> bool [K, N]: label under-or-equal to
        its row's node (False where the node is -1)."""
        nodes = np.asarray(nodes, dtype=np.int64)[:, None]
        safe = np.maximum(nodes, 0)
        t = self.tin[np.asarray(label_ids, dtype=np.int64)]
        return (nodes >= 0) & (self.tin[safe] <= t) & (t < self.tout[safe])

    def subtree_leaves(self, name: str) -> frozenset[str]:
        """The leaves under a node (itself, when a leaf)."""
        node = int(self.ids([name])[0])
        lo, hi = self.tin[node], self.tout[node]
        inside = self.leaves[(self.tin[self.leaves] >= lo) & (self.tin[self.leaves] < hi)]
        return frozenset(self.names[int(i)] for i in inside)

    def summary(self) -> dict:
        """{"source", "nodes", "leaves", "internal", "roots" (names, the first 10), "n_roots",
        "max_depth", "max_height"}."""
        return {"source": self.source, "nodes": len(self.names), "leaves": int(self.leaves.size),
                "internal": int(self.internal.size), "n_roots": len(self.roots),
                "roots": [self.names[r] for r in self.roots[:10]], "max_depth": int(self.depth.max()),
                "max_height": int(self.height.max())}
