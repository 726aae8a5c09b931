"""Activation store and loader: round trip, crash safety (a real SIGKILL), damage detection,
token -> image/patch mapping, shuffling, ordering and resumable positions."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from saeengine.errors import LockedError
from saeengine.store import (ActivationLoader, ActivationStore, ActivationWriter, StoreError,
                             StoreIncompleteError)

D = 24


def write_store(path, acts, *, dtype="float32", shard_tokens=300, chunk=170, patches=10):
    n = acts.shape[0]
    tokens = np.arange(n)
    with ActivationWriter(path, d_in=acts.shape[1], dtype=dtype, backbone="tiny-vit", layer="blocks.3",
                          token_kind="patch", shard_tokens=shard_tokens) as writer:
        for i in range(0, n, chunk):
            writer.add(acts[i:i + chunk], tokens[i:i + chunk] // patches, tokens[i:i + chunk] % patches)
    return ActivationStore(path, verify=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_and_sources(tmp_path, dtype):
    acts = torch.randn(1000, D)
    store = write_store(tmp_path / "s", acts, dtype=dtype)
    assert store.n_tokens == 1000 and len(store.meta.shards) == 4 and store.meta.complete
    expected = acts.to(store.dtype)
    assert torch.equal(store.get(np.arange(1000)), expected)
    rows = np.array([999, 5, 300, 299, 600])  # unsorted, across shard boundaries
    assert torch.equal(store.get(rows), expected[rows])
    image, position = store.sources(rows)
    assert image.tolist() == (rows // 10).tolist() and position.tolist() == (rows % 10).tolist()
    meta = ActivationStore(tmp_path / "s").meta
    assert (meta.backbone, meta.layer, meta.token_kind, meta.dtype) == ("tiny-vit", "blocks.3", "patch", dtype)


def _resident_pages(array: np.ndarray) -> int:
    """KiB of a memory-mapped array resident in this process (its mapping's Rss in /proc/self/smaps)."""
    address = array.ctypes.data
    current = None
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            current = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif current and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("the mapping was not found")


def test_drop_pages_releases_passed_shards_and_reads_stay_right(tmp_path):
    acts = torch.randn(1200, 256)  # 4 shards of 300 rows, 300 KiB each
    store = write_store(tmp_path / "s", acts)
    assert torch.equal(store.get(np.arange(1200)), acts)  # every page mapped in
    before = [_resident_pages(a) for a in store._data]
    store.drop_pages(650)  # shards 0 and 1 end at or before row 650; shard 2 does not
    after = [_resident_pages(a) for a in store._data]
    assert after[0] < before[0] / 4 and after[1] < before[1] / 4
    assert after[2] == before[2] and after[3] == before[3]
    assert torch.equal(store.get(np.arange(1200)), acts)  # dropped pages read back from the file


def test_content_hash_names_the_content(tmp_path):
    acts = torch.randn(400, D)
    a = write_store(tmp_path / "a", acts, shard_tokens=100)
    b = write_store(tmp_path / "b", acts, shard_tokens=100)
    changed = acts.clone()
    changed[123, 4] += 1
    c = write_store(tmp_path / "c", changed, shard_tokens=100)
    assert a.content_hash == b.content_hash != c.content_hash


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    from saeengine.store import ActivationWriter
    directory = sys.argv[1]
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((100_000, 24), dtype=np.float32)
    w = ActivationWriter(directory, d_in=24, dtype="float32", shard_tokens=1000)
    for i in range(0, acts.shape[0], 250):
        w.add(acts[i:i + 250], np.arange(i, i + 250) // 10, np.arange(i, i + 250) % 10)
        time.sleep(0.002)
    w.close()
""")


def test_killed_writer_leaves_finished_shards_valid_and_resumes(tmp_path):
    directory = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(directory)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until a few shards are finished
            if len(list(directory.glob("shard-*.src"))) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(StoreIncompleteError, match="did not finish.*resume=True"):
        ActivationStore(directory)
    partial = ActivationStore(directory, allow_incomplete=True, verify=True)
    expected = np.random.default_rng(0).standard_normal((100_000, 24), dtype=np.float32)
    assert partial.n_tokens >= 2000 and partial.n_tokens % 1000 == 0
    assert torch.equal(partial.get(np.arange(partial.n_tokens)), torch.from_numpy(expected[:partial.n_tokens]))

    # An unfinished shard (as a kill mid-write leaves it) is discarded on resume.
    (directory / "shard-99999.bin.partial").write_bytes(b"\0" * 10)
    writer = ActivationWriter(directory, resume=True)
    assert not (directory / "shard-99999.bin.partial").exists()
    done = writer.n_tokens
    rows = np.arange(done, 5000)
    writer.add(expected[done:5000], rows // 10, rows % 10)
    writer.close()
    store = ActivationStore(directory, verify=True)
    assert torch.equal(store.get(np.arange(5000)), torch.from_numpy(expected[:5000]))
    assert store.sources([4321])[0].tolist() == [432]


def test_truncated_and_corrupted_shards_are_detected(tmp_path):
    write_store(tmp_path / "s", torch.randn(600, D), shard_tokens=300)
    shard = tmp_path / "s" / "shard-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])
    with pytest.raises(StoreError, match="shard-00001.bin is .* bytes but the metadata says 300 tokens"):
        ActivationStore(tmp_path / "s")
    flipped = bytearray(data)
    flipped[100] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    ActivationStore(tmp_path / "s")  # sizes match: only the checksum can tell
    with pytest.raises(StoreError, match="checksum mismatch"):
        ActivationStore(tmp_path / "s", verify=True)
    shard.unlink()
    with pytest.raises(StoreError, match="shard-00001.bin is missing"):
        ActivationStore(tmp_path / "s")


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="meta.json is missing"):
        ActivationStore(tmp_path)
    writer = ActivationWriter(tmp_path / "s", d_in=D)
    with pytest.raises(ValueError, match=r"must be \[n, 24\]"):
        writer.add(torch.randn(5, 7), np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="image_index has 4 entries for 5"):
        writer.add(torch.randn(5, D), np.zeros(4), np.zeros(5))
    with pytest.raises(LockedError, match="in use by pid"):  # the first writer still holds the store
        ActivationWriter(tmp_path / "s", d_in=D)
    writer.abort()
    with pytest.raises(StoreError, match="not empty.*resume=True"):
        ActivationWriter(tmp_path / "s", d_in=D)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        ActivationWriter(tmp_path / "t", d_in=D, dtype="int8")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore(tmp_path / "u")


@pytest.fixture
def store(tmp_path):
    # 100 images x 10 patches; the value of token t is t in every column
    acts = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, D)
    return write_store(tmp_path / "s", acts, shard_tokens=300)


def test_shuffled_epoch_covers_every_token_once_and_mixes_images(store):
    loader = ActivationLoader(store, 64, seed=3, drop_last=False)
    batches = list(loader)
    tokens = torch.cat([b[:, 0] for b in batches]).long()
    assert sorted(tokens.tolist()) == list(range(1000))
    assert tokens.tolist() != sorted(tokens.tolist())
    images_in_first = torch.unique(batches[0][:, 0].long() // 10).numel()
    assert images_in_first > 20  # a batch of 64 tokens from many of the 100 images
    again = list(ActivationLoader(store, 64, seed=3, drop_last=False))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = torch.cat([b[:, 0] for b in ActivationLoader(store, 64, seed=4, drop_last=False)])
    assert not torch.equal(other, tokens.float())


def test_ordered_mode_and_epochs(store):
    ordered = torch.cat(list(ActivationLoader(store, 128, shuffle=False, drop_last=False)))
    assert ordered[:, 0].tolist() == list(range(1000))
    two = list(ActivationLoader(store, 100, seed=0, epochs=2, dtype=torch.float16))
    assert len(two) == 20 and two[0].dtype == torch.float16
    first, second = torch.cat(two[:10])[:, 0], torch.cat(two[10:])[:, 0]
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)


def test_resumed_loader_continues_exactly(store):
    full = list(ActivationLoader(store, 64, seed=1, epochs=2))
    loader = ActivationLoader(store, 64, seed=1, epochs=2)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 19:  # past the first epoch's 15 batches
            break
    state = loader.state_dict()
    resumed = ActivationLoader(store, 64, seed=999, epochs=2)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))
    with pytest.raises(ValueError, match="batch_size=64"):
        ActivationLoader(store, 32).load_state_dict(state)


def test_loader_benchmark_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "loader.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_loader.py"), "--gib", "0.005",
                           "--d", "64", "--batch", "256", "--seconds", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "GB/s" in proc.stdout and out.exists()


def test_image_paths_progress_and_one_shard_per_flush(tmp_path):
    names = ["a/1.jpg", "b/naïve name.png", "c/line\nbreak.tif", "d/\"quoted\".jpg"]
    writer = ActivationWriter(tmp_path / "s", d_in=D, dtype="float32", auto_shard=False, shard_tokens=2)
    assert writer.progress == {} and writer.n_images == 0
    for i, name in enumerate(names):
        writer.add_image_paths([name])
        writer.add(torch.full((3, D), float(i)), [i] * 3, [0, 1, 2])  # buffered only: auto_shard=False
        assert len(writer.meta.shards) == i
        writer.flush({"images_done": i + 1, "note": [i]})
        assert writer.progress == {"images_done": i + 1, "note": [i]} and writer.n_images == i + 1
    writer.close()
    store = ActivationStore(tmp_path / "s")
    assert [s.tokens for s in store.meta.shards] == [3, 3, 3, 3]
    assert store.image_paths == names and store.image_path(2) == names[2]
    image, _ = store.sources([7])
    assert store.image_path(int(image[0])) == "c/line\nbreak.tif"
    assert store.meta.progress == {"images_done": 4, "note": [3]}


def test_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    import saeengine.store.reader as reader
    other = write_store(tmp_path / "t", torch.randn(1000, D), shard_tokens=300).directory  # 4 shards, verify=True
    hashed = []
    real = reader.file_digest
    monkeypatch.setattr(reader, "file_digest", lambda *paths: hashed.append(paths[0].name) or real(*paths))
    fresh = ActivationStore(other)  # verified by write_store in this process: not hashed again
    for _ in ActivationLoader(fresh, 64, seed=0, epochs=2):
        pass
    assert hashed == []
    os.utime(other / "shard-00002.bin", ns=(1, 1))  # a changed file is hashed again, on its first read
    store = ActivationStore(other)
    store.get([0])
    assert hashed == []
    for _ in ActivationLoader(store, 64, seed=0, epochs=2):
        pass
    assert hashed == ["shard-00002.bin"]  # once, not once per batch


@pytest.mark.parametrize("kind", ["tensor", "numpy", "slice"])
def test_add_copies_the_callers_buffer(tmp_path, kind):
    buffer = torch.randn(8, D)
    rows = {"tensor": buffer, "numpy": buffer.numpy(), "slice": buffer[2:6]}[kind]
    expected = torch.as_tensor(rows).clone()
    with ActivationWriter(tmp_path / "s", d_in=D, dtype="float32") as writer:
        writer.add(rows, np.arange(len(expected)), np.zeros(len(expected), dtype=int))
        buffer.fill_(7.0)  # the caller reuses its buffer before the rows are written
    assert torch.equal(ActivationStore(tmp_path / "s").get(np.arange(len(expected))), expected)
