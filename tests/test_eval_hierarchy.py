"""The is-a hierarchy: depth, height, LCA / LCH, the deepest node holding m labels, subtree
membership and leaves against brute force on random trees and forests; the is-a file
reader; the bad inputs (a named cycle, two parents, unknown labels, bad lines); the
ImageNet WordNet tree against a walk of its own edges; speed at WordNet's size."""

import time

import numpy as np
import pytest

from saeengine.errors import InputError
from saeengine.eval.hierarchy import Hierarchy


# ----- brute force ---------------------------------------------------------------------------
def random_forest(n: int, roots: int, rng) -> list[tuple[str, str]]:
    """Edges of a random forest over n nodes with ``roots`` roots; names are shuffled so
    ids and order carry no structure."""
    names = [f"node {i:03d}" for i in rng.permutation(n)]
    edges = []
    for i in range(roots, n):
        parent = int(rng.integers(0, i)) if rng.random() < 0.7 else max(0, i - 1)  # some long chains
        edges.append((names[i], names[parent]))
    order = rng.permutation(len(edges))
    return [edges[i] for i in order]


class Brute:
    """The same questions answered by walking a parent dict."""

    def __init__(self, edges):
        self.parent = dict(edges)
        self.nodes = sorted(set(self.parent) | set(self.parent.values()))
        self.children = {v: [c for c, p in self.parent.items() if p == v] for v in self.nodes}

    def ancestors(self, v):  # v first, the root last
        out = [v]
        while out[-1] in self.parent:
            out.append(self.parent[out[-1]])
        return out

    def depth(self, v):
        return len(self.ancestors(v)) - 1

    def leaves_under(self, v):
        return {u for u in self.nodes if not self.children[u] and v in self.ancestors(u)}

    def height(self, v):
        return max(self.depth(u) - self.depth(v) for u in self.leaves_under(v))

    def lca(self, a, b):
        common = set(self.ancestors(a)) & set(self.ancestors(b))
        return max(common, key=self.depth) if common else None

    def lch(self, labels):  # iterated pairwise, as the spec says
        node = labels[0]
        for other in labels[1:]:
            node = None if node is None else self.lca(node, other)
        return node

    def deepest_holding(self, labels, m):
        holding = [v for v in self.nodes if sum(v in self.ancestors(x) for x in labels) >= m]
        return max(holding, key=self.depth) if holding else None


@pytest.mark.parametrize("seed,roots", [(0, 1), (1, 1), (2, 3)])
def test_structure_and_queries_match_brute_force(seed, roots):
    rng = np.random.default_rng(seed)
    edges = random_forest(60, roots, rng)
    h, brute = Hierarchy.from_edges(edges), Brute(edges)
    assert sorted(h.names) == brute.nodes
    for v in brute.nodes:
        i = h.index[v]
        assert h.depth[i] == brute.depth(v)
        assert h.height[i] == brute.height(v)
        assert h.subtree_leaves(v) == brute.leaves_under(v)
        assert bool(h.is_leaf[i]) == (not brute.children[v])
    assert {h.names[i] for i in h.internal} == {v for v in brute.nodes if brute.children[v]}
    assert len(h.roots) == roots
    for _ in range(300):
        a, b = rng.choice(brute.nodes, 2)
        assert h.lca(a, b) == brute.lca(a, b)
    for size in (1, 2, 5, 16):
        rows = [list(rng.choice(brute.nodes, size)) for _ in range(40)]
        ids = np.array([h.ids(r) for r in rows])
        fast = h.lch_rows(ids)
        for r, f in zip(rows, fast):
            expect = brute.lch(r)
            assert h.lch(r) == expect
            assert h.name(int(f)) == expect
        for m in sorted({size, size // 2 + 1}):
            got = h.deepest_holding(ids, m)
            for r, g in zip(rows, got):
                assert h.name(int(g)) == brute.deepest_holding(r, m)
        nodes = h.ids(list(rng.choice(brute.nodes, len(rows))))
        inside = h.under(nodes, ids)
        for v, r, row in zip(nodes, rows, inside):
            assert list(row) == [h.names[v] in brute.ancestors(x) for x in r]


def test_small_tree_by_hand():
    h = Hierarchy.from_edges([("cat", "feline"), ("lion", "feline"), ("feline", "mammal"), ("dog", "mammal"),
                              ("trout", "fish"), ("fish", "animal"), ("mammal", "animal")])
    assert h.lch(["cat", "lion"]) == "feline" and h.lch(["cat", "dog"]) == "mammal"
    assert h.lch(["cat", "trout", "lion"]) == "animal" and h.lch(["dog"]) == "dog"
    assert h.lca("cat", "feline") == "feline"  # ancestor-or-self
    assert h.height[h.index["animal"]] == 3 and h.height[h.index["fish"]] == 1 and h.height[h.index["cat"]] == 0
    assert h.depth[h.index["cat"]] == 3 and h.depth[h.index["animal"]] == 0
    assert h.subtree_leaves("mammal") == {"cat", "lion", "dog"}
    assert h.summary()["internal"] == 4 and h.summary()["leaves"] == 4
    with pytest.raises(InputError, match="empty set"):
        h.lch([])


def test_forest_has_no_common_hypernym_across_trees():
    h = Hierarchy.from_edges([("a1", "A"), ("a2", "A"), ("b1", "B")])
    assert h.lca("a1", "b1") is None and h.lch(["a1", "a2", "b1"]) is None
    assert h.lch(["a1", "a2"]) == "A"
    ids = h.ids(["a1", "a2", "b1"])[None]
    assert h.lch_rows(ids)[0] == -1
    assert h.name(int(h.deepest_holding(ids, 2)[0])) == "A"
    assert h.deepest_holding(ids, 3)[0] == -1


# ----- the is-a file and bad inputs ----------------------------------------------------------
def test_reads_an_is_a_file(tmp_path):
    path = tmp_path / "isa.tsv"
    path.write_text("# my hierarchy\n\ngolden retriever\tdog  # a comment\ndog\tanimal\ntabby cat\tanimal\n"
                    "dog\tanimal\n", encoding="utf-8")  # a repeated edge is harmless
    h = Hierarchy.read(path)
    assert h.lch(["golden retriever", "tabby cat"]) == "animal"
    assert h.height[h.index["animal"]] == 2 and len(h) == 4
    assert h.source == str(path)


@pytest.mark.parametrize("text,match", [
    ("a\tb\nb\tc\nc\ta\n", r"a cycle: (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"),
    ("x\troot\na\tb\nb\ta\n", r"a cycle: (a -> b -> a|b -> a -> b)"),
    ("a\ta\n", "a cycle: a -> a"),
    ("a\tb\na\tc\n", "'a' has two parents, 'b' and 'c'"),
    ("a b\n", r"isa.tsv:1: 'a b' is not 'child<TAB>parent'"),
    ("# c\na\tb\tc\n", r"isa.tsv:2: .*exactly two names"),
    ("# only comments\n\n", "no edges"),
])
def test_bad_is_a_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "isa.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        Hierarchy.read(path)


def test_missing_file_and_unknown_labels(tmp_path):
    with pytest.raises(InputError, match="cannot read the is-a file"):
        Hierarchy.read(tmp_path / "missing.tsv")
    h = Hierarchy.from_edges([("a", "r"), ("b", "r")])
    with pytest.raises(InputError, match=r"2 label\(s\) are not in the hierarchy .*'x', 'y'.*add a 'label<TAB>parent'"):
        h.ids(["a", "x", "y", "x"])
    with pytest.raises(InputError, match="'zzz'"):
        h.lch(["a", "zzz"])
    with pytest.raises(InputError, match="m=3 must be in 1..2"):
        h.deepest_holding(h.ids(["a", "b"])[None], 3)


# ----- WordNet and speed ---------------------------------------------------------------------
def test_imagenet_tree_matches_a_walk_of_its_edges():
    from saeengine.eval.ontology import imagenet_tree
    from saeengine.eval.wordnet import imagenet_hierarchy

    wn = imagenet_hierarchy()
    h = imagenet_tree()
    brute = Brute(wn.edges)
    assert all(h.is_leaf[h.index[c]] for c in wn.class_ids)  # ImageNet's classes are the leaves
    assert set(h.names[i] for i in h.leaves) == set(wn.class_ids)
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = list(rng.choice(wn.class_ids, 4))
        assert h.lch(row) == brute.lch(row)
    root = h.roots[0]
    assert h.names[root] == "n00001740" and h.height[root] == max(brute.depth(c) for c in wn.class_ids)
    assert h.label(h.index["n01440764"]) == wn.names["n01440764"]


def test_queries_are_fast_at_wordnet_size():
    rng = np.random.default_rng(0)
    edges = random_forest(2000, 1, rng)
    start = time.perf_counter()
    h = Hierarchy.from_edges(edges)
    ids = rng.integers(0, len(h), (5000, 16))
    h.lch_rows(ids)
    h.deepest_holding(ids, 15)
    h.under(ids[:, 0], ids)
    assert time.perf_counter() - start < 5.0  # ~0.1 s on an idle core; generous for a busy CI
