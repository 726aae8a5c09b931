"""Recording over several ranks (issue 19): each rank records its images into a part, rank 0
merges them into one recording. The oracle is the single-process record_activations of the
same images: the merged stores must equal it (meta.json fields, content hash included,
every shard's bytes, images.jsonl, recording.json). Plus a merge killed half-way (nothing
reads as a recording, a rerun finishes), ranks that disagree, and the split rules."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from kill_child import kill_after_lines
from merge_helpers import cli_args, slow_merges
from PIL import Image

from saeengine.backbones import record_activations
from saeengine.distributed import record as drec
from saeengine.distributed._spawn import run
from saeengine.errors import ConfigError, InputError, StoreError
from saeengine.store import ActivationStore
from saeengine.store.metadata import StoreMetadata, shard_paths

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")

LAYERS = ["blocks.1", "blocks.2"]  # 64 and 16 tokens per image: shards fill at different rates
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "record_memory.py"


def tiny_backbone():
    spec = importlib.util.spec_from_file_location("record_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_backbone()


def make_images(root: Path, n: int) -> Path:
    """n random PNGs in two subfolders (so paths keep their folder: a/1.png, b/0.png, ...)."""
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
    return root


CASES = {  # name: (images, settings); 5 images over 2 ranks split 3 + 2 (batch 1), or 1 batch: rank 1 idle
    "uneven": (5, {"batch_size": 1, "shard_tokens": 128}),
    "one-batch": (5, {"batch_size": 8, "shard_tokens": 64}),
    "aligned": (8, {"batch_size": 1, "shard_tokens": 64}),  # 2 shard cycles of 4 images: split 4 + 4
    "skipped": (5, {"batch_size": 1, "shard_tokens": 64, "skip_unreadable": True}),  # image 3 is not an image
}


def arrays(n: int = 5) -> list:
    """In-memory images (recorded as "#<index>", no paths); image 3 has no valid shape."""
    out = [np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8) for i in range(n)]
    out[3] = np.zeros(7, np.uint8)
    return out


def _ranks(rank, world, tmp):
    """Every case on 2 gloo ranks in one spawn (spawning costs seconds)."""
    tmp = Path(tmp)
    out = {}
    for name, (_, kw) in CASES.items():
        drec.record_distributed(tiny_backbone(), tmp / f"imgs-{name}", LAYERS, tmp / f"dist-{name}", progress=False,
                                **kw)
    # the merge killed in the test process before this spawn: the rerun finishes it
    drec.record_distributed(tiny_backbone(), tmp / "imgs-uneven", LAYERS, tmp / "crashed", progress=False,
                            resume=True, **CASES["uneven"][1])
    # a finished recording rerun with resume=True: returned as it is
    drec.record_distributed(tiny_backbone(), tmp / "imgs-uneven", LAYERS, tmp / "crashed", progress=False,
                            resume=True, **CASES["uneven"][1])
    drec.record_distributed(tiny_backbone(), arrays(), LAYERS, tmp / "dist-arrays", progress=False, batch_size=1,
                            shard_tokens=64, skip_unreadable=True)
    try:  # rank 1 names another layer
        drec.record_distributed(tiny_backbone(), tmp / "imgs-uneven", ["blocks.1" if rank == 0 else "blocks.0"],
                                tmp / "disagree", progress=False, batch_size=1)
    except ConfigError as exc:
        out["disagree"] = str(exc)
    return out


def assert_same_recording(single: Path, merged: Path) -> None:
    assert json.loads((single / "recording.json").read_text()) == json.loads((merged / "recording.json").read_text())
    for layer in LAYERS:
        a, b = StoreMetadata.read(single / layer), StoreMetadata.read(merged / layer)
        assert a == b  # every field: identity, shards (sizes, checksums), images, progress, content hash
        assert a.content_hash == b.content_hash is not None
        for shard in a.shards:
            for x, y in zip(shard_paths(single / layer, shard.name), shard_paths(merged / layer, shard.name)):
                assert x.read_bytes() == y.read_bytes(), x.name
        for path in (single / layer / "images.jsonl", merged / layer / "images.jsonl"):
            assert path.exists() == (a.images.count > 0)
        if a.images.count:
            assert (single / layer / "images.jsonl").read_bytes() == (merged / layer / "images.jsonl").read_bytes()
        store = ActivationStore(merged / layer, verify=True)
        assert store.image_paths == ActivationStore(single / layer).image_paths


def _prepare_parts(tmp: Path, images: Path, out: Path, kw: dict, world: int = 2):
    """What the ranks do before the merge, in this process (no collectives involved)."""
    kwargs = {"keep": ("patch",), "dtype": "float16", "stop_early": True, "skip_unreadable": False, **kw}
    prepared = drec._prepare(tiny_backbone(), images, LAYERS, out, True, world, **kwargs)
    for rank in range(world):
        drec._record_part(tiny_backbone(), prepared, rank, world, False, **kwargs)
    return prepared


@pytest.mark.filterwarnings("ignore:skipped:UserWarning", "ignore:.*could not be read:UserWarning")
def test_two_ranks_equal_one_process_and_a_killed_merge_finishes(tmp_path, monkeypatch):
    for name, (n, _) in CASES.items():
        make_images(tmp_path / f"imgs-{name}", n)
    (tmp_path / "imgs-skipped" / "a" / "3.png").write_bytes(b"not an image")  # in rank 1's part (3 + 2)
    # A merge that dies after its second file: no recording appears, the parts stay.
    prepared = _prepare_parts(tmp_path, tmp_path / "imgs-uneven", tmp_path / "crashed", CASES["uneven"][1])
    calls = []

    def dying(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as a kill: no handler of the merge runs
        return real(path, data)

    real = drec._write_synced
    monkeypatch.setattr(drec, "_write_synced", dying)
    with pytest.raises(KeyboardInterrupt):
        drec.merge_parts(tmp_path / "crashed", prepared.settings, prepared.items, prepared.ranges)
    monkeypatch.undo()
    assert not (tmp_path / "crashed").exists()
    with pytest.raises(StoreError):
        ActivationStore(tmp_path / "crashed" / "blocks.1")
    assert (drec.parts_dir(tmp_path / "crashed") / drec.MERGED).is_dir()  # the half merge, out of the way

    answers = run(_ranks, 2, str(tmp_path), timeout=240)

    for name, (_, kw) in CASES.items():
        single = tmp_path / f"single-{name}"
        record_activations(tiny_backbone(), tmp_path / f"imgs-{name}", LAYERS, single, progress=False, **kw)
        assert_same_recording(single, tmp_path / f"dist-{name}")
        assert not drec.parts_dir(tmp_path / f"dist-{name}").exists()
    record_activations(tiny_backbone(), arrays(), LAYERS, tmp_path / "single-arrays", progress=False, batch_size=1,
                       shard_tokens=64, skip_unreadable=True)
    assert_same_recording(tmp_path / "single-arrays", tmp_path / "dist-arrays")
    for name, skipped in (("arrays", ["#3"]), ("skipped", ["a/3.png"])):  # named as in the whole list
        assert StoreMetadata.read(tmp_path / f"dist-{name}" / "blocks.1").progress["skipped"] == skipped
    assert_same_recording(tmp_path / "single-uneven", tmp_path / "crashed")
    assert not drec.parts_dir(tmp_path / "crashed").exists()
    for answer in answers:  # the same error on both ranks, naming the field and the ranks
        assert "layers" in answer["disagree"] and "blocks.1" in answer["disagree"]
        assert "rank 0" in answer["disagree"] and "rank 1" in answer["disagree"]
    assert not (tmp_path / "disagree").exists()


KILLED_MERGE = """
import sys, time
sys.path.insert(0, {tests!r})
from test_distributed_record import LAYERS, tiny_backbone
from saeengine.distributed import record as drec
kw = dict(keep=("patch",), dtype="float16", stop_early=True, skip_unreadable=False, batch_size=1, shard_tokens=64)
prepared = drec._prepare(tiny_backbone(), {images!r}, LAYERS, drec.Path({out!r}), True, 2, **kw)
real = drec._write_synced
def slow(path, data):
    real(path, data)
    print("wrote", path, flush=True)
    time.sleep(0.5)
drec._write_synced = slow
drec.merge_parts(drec.Path({out!r}), prepared.settings, prepared.items, prepared.ranges)
print("done")
"""


def test_merge_links_part_shards_that_are_single_process_shards(tmp_path):
    images = make_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    prepared = _prepare_parts(tmp_path, images, out, {"batch_size": 1, "shard_tokens": 64})
    # blocks.1: 64 tokens an image, a shard each; blocks.2: 16, a shard every 4 images: parts of 4 images
    assert prepared.ranges == [(0, 4), (4, 8)]
    # A merge SIGKILLed after its third file: no recording at out, the parts intact; the rerun merges.
    assert kill_after_lines(KILLED_MERGE.format(tests=str(Path(__file__).parent), images=str(images), out=str(out)),
                            3, 0.1)
    assert not out.exists() and (drec.parts_dir(out) / drec.MERGED).is_dir()
    drec.merge_parts(out, prepared.settings, prepared.items, prepared.ranges)
    for layer in LAYERS:
        meta = StoreMetadata.read(out / layer)
        for shard in meta.shards:
            bin_path, src_path = shard_paths(out / layer, shard.name)
            assert bin_path.stat().st_nlink == 2  # a hard link to the part's file: no copy
            assert src_path.stat().st_nlink == 1  # rewritten with global image indices
    single = tmp_path / "single"
    record_activations(tiny_backbone(), images, LAYERS, single, progress=False, batch_size=1, shard_tokens=64)
    assert_same_recording(single, out)


def test_part_ranges_are_contiguous_whole_batches():
    for n, batch, world in ((5, 1, 2), (5, 2, 2), (5, 8, 2), (100, 7, 3), (3, 1, 4)):
        ranges = drec.part_ranges(n, batch, world)
        assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
        assert all(lo % batch == 0 for lo, hi in ranges if hi > lo)
        sizes = [-(-(hi - lo) // batch) for lo, hi in ranges]  # batches per rank differ by at most one
        assert max(sizes) - min(sizes) <= 1
    assert drec.single_process_shards(np.array([64, 64, 64, 64, 64]), 128) == [128, 128, 64]
    assert drec.single_process_shards(np.array([0, 64, 0]), 1000) == [64]
    assert drec.shard_cycle({"blocks.1": 64, "blocks.2": 16}, 1, 128) == 8  # lcm(2, 8)
    assert drec.split_images(5, 1, 2, 8) == [(0, 3), (3, 5)]  # one cycle for two ranks: whole batches
    assert drec.split_images(16, 1, 2, 8) == [(0, 8), (8, 16)]


def test_interrupted_parts_need_resume_and_the_same_world(tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    kw = {"keep": ("patch",), "dtype": "float16", "stop_early": True, "skip_unreadable": False, "batch_size": 1,
          "shard_tokens": 64}
    prepared = drec._prepare(tiny_backbone(), images, LAYERS, tmp_path / "out", False, 2, **kw)
    drec._record_part(tiny_backbone(), prepared, 0, 2, False, **kw)  # rank 0 recorded, then everything stopped
    with pytest.raises(ConfigError, match=r"resume=True .* or delete"):
        drec._prepare(tiny_backbone(), images, LAYERS, tmp_path / "out", False, 2, **kw)
    with pytest.raises(InputError, match="by 2 ranks, but this run has 3"):
        drec._prepare(tiny_backbone(), images, LAYERS, tmp_path / "out", True, 3, **kw)
    with pytest.raises(InputError, match="need torch.distributed"):
        drec.rank_world(None, 2)
    with pytest.raises(InputError, match=r"--nproc-per-node <ranks>") as info:  # only a rank given
        drec.rank_world(1, None)
    assert "None)" not in str(info.value) and "nproc-per-node None" not in str(info.value)


def test_a_parts_folder_this_code_did_not_make_is_refused_not_deleted(tmp_path, monkeypatch):
    images = make_images(tmp_path / "imgs", 2)
    kw = {"keep": ("patch",), "dtype": "float16", "stop_early": True, "skip_unreadable": False, "batch_size": 1,
          "shard_tokens": 64}
    theirs = tmp_path / "out.parts"  # the user's own folder, by chance named like the parts folder
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(InputError, match="out.parts exists but is not the parts folder of a distributed record"):
            drec._prepare(tiny_backbone(), images, LAYERS, tmp_path / "out", resume, 2, **kw)
    with pytest.warns(UserWarning, match="not removing it"):
        assert not drec.remove_parts(theirs, "record")
    assert (theirs / "notes.txt").read_text() == "mine"
    # an empty folder (a claim killed before its marker) is taken over; the finished merge removes it
    empty = drec.parts_dir(tmp_path / "new")
    empty.mkdir()
    prepared = _prepare_parts(tmp_path, images, tmp_path / "new", {"batch_size": 1, "shard_tokens": 64})
    drec._finish(prepared)
    assert not empty.exists() and StoreMetadata.read(tmp_path / "new" / "blocks.1").complete
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", "/"):
        with pytest.raises(InputError, match="does not name a folder"):
            drec._prepare(tiny_backbone(), images, LAYERS, out, True, 2, **kw)


def test_another_ranks_error_keeps_its_class_where_it_can():
    from saeengine import errors
    from saeengine.distributed import comm

    assert comm._error_class("saeengine.errors", "ConfigError") is errors.ConfigError
    assert comm._error_class("saeengine.errors", "StoreIncompleteError") is errors.StoreIncompleteError
    assert comm._error_class("builtins", "OSError") is OSError
    assert comm._error_class("builtins", "UnicodeDecodeError") is InputError  # needs more than a message
    assert comm._error_class("mypackage", "MyError") is InputError
    assert comm._error_class("builtins", "KeyboardInterrupt") is InputError  # not an Exception
    with pytest.raises(ConfigError, match="boom"):  # one process: its own error, nothing gathered
        comm.agree(ConfigError("boom"), "testing")
    comm.agree(None, "testing")


def _cli_ranks(rank, world, tmp):
    """`torchrun -m saeengine record ...` as the CLI hook runs it: the process group from
    torchrun's environment (launch.distributed), every rank the same arguments, rank 0's
    merge slower than the collective timeout (merge_helpers)."""
    from saeengine.cli_record import add_record_parser

    slow_merges(drec)
    args = cli_args(add_record_parser, ["record", f"{tmp}/imgs", "--layers", ",".join(LAYERS), "--out-dir",
                                        f"{tmp}/cli", "--batch-size", "1", "--shard-tokens", "128", "--device",
                                        "cpu", "--no-progress"])
    return drec.run_record_distributed(args, lambda args: tiny_backbone())


def test_command_line_under_torchrun_environment(tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    assert run(_cli_ranks, 2, str(tmp_path), timeout=120, init=False) == [0, 0]
    record_activations(tiny_backbone(), images, LAYERS, tmp_path / "single", progress=False, batch_size=1,
                       shard_tokens=128)
    assert_same_recording(tmp_path / "single", tmp_path / "cli")
