"""Faults while writing an activation store (issue 14, classes 7, 8, 9): a writer SIGKILLed at
chosen and random points resumes to the same content hash as an uninterrupted run; a second
writer fails at once while the first one's data stays intact; a full disk (a real small
tmpfs, and a monkeypatched ENOSPC at every write of a commit) raises DiskFullError, leaves
nothing half-written, and the store resumes from its last commit."""

import errno
import gc
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

import saeengine.store.images as images_mod
import saeengine.store.writer as writer_mod
from saeengine.errors import DiskFullError, LockedError, StoreIncompleteError
from saeengine.store import ActivationStore, ActivationWriter, StoreMetadata

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# -- a deterministic recorder: image i gives `tokens` rows; paths and progress as recording would
class Feed:
    def __init__(self, d=16, tokens=10, images=24, batch=4, dtype="float16"):
        self.d, self.tokens, self.images, self.batch, self.dtype = d, tokens, images, batch, dtype

    def path(self, i):
        return f"dir_{i % 3}/img_{i:04d}.png"

    def acts(self, i):
        return np.random.default_rng(i).standard_normal((self.tokens, self.d), dtype=np.float32)

    def open(self, directory, mode, resume=True):
        """mode "progress": auto_shard=False, a flush with progress per batch (resume from
        progress); mode "tokens": auto_shard=True with shards that cut through batches
        (resume from n_tokens / n_images)."""
        return ActivationWriter(directory, d_in=self.d, dtype=self.dtype, backbone="toy", layer="blocks.0",
                                token_kind="patch", resume=resume, auto_shard=mode == "tokens", shard_tokens=17,
                                extra={"tokens_per_image": self.tokens})

    def run(self, writer, mode, delay=0.0):
        """Feed everything after what ``writer`` has committed, then close it."""
        start = writer.progress.get("next_image", 0) if mode == "progress" else 0
        for first in range(start, self.images, self.batch):
            last = min(first + self.batch, self.images)
            ids = list(range(first, last))
            if mode == "progress":
                writer.add_image_paths([self.path(i) for i in ids])
                writer.add(np.concatenate([self.acts(i) for i in ids]), np.repeat(ids, self.tokens),
                           np.tile(np.arange(self.tokens), len(ids)))
                writer.flush({"next_image": last})
            else:  # token level: skip what is committed
                new_paths = [self.path(i) for i in ids if i >= writer.n_images]
                if new_paths:
                    writer.add_image_paths(new_paths)
                rows = np.arange(first * self.tokens, last * self.tokens)
                keep = rows >= writer.n_tokens
                if keep.any():
                    writer.add(np.concatenate([self.acts(i) for i in ids])[keep], rows[keep] // self.tokens,
                               rows[keep] % self.tokens)
            if delay:
                time.sleep(delay)
        writer.close()


def uninterrupted(feed, directory, mode):
    feed.run(feed.open(directory, mode, resume=False), mode)
    return ActivationStore(directory, verify=True)


# -- fault injection: count, or die at, the n-th call of one operation of a commit -----------
def arm(op, n, on_hit):
    """Call ``on_hit(path, array)`` on the n-th ``op``: "fsync"/"replace" (os calls),
    "meta" (a meta.json write) or "write" (a shard file write)."""
    count = [0]

    def hit(*args):
        count[0] += 1
        if count[0] == n:
            on_hit(*args)

    if op in ("fsync", "replace"):
        real = getattr(os, op)
        setattr(os, op, lambda *a, **k: (hit(), real(*a, **k))[1])
    elif op == "meta":
        real_meta = StoreMetadata.write
        StoreMetadata.write = lambda self, d: (hit(), real_meta(self, d))[1]
    elif op == "write":
        real_write = writer_mod._write_durably
        writer_mod._write_durably = lambda path, array: (hit(path, array), real_write(path, array))[1]
    return count


def die(path=None, array=None):
    if array is not None:  # half the shard file reaches the disk first
        raw = memoryview(np.ascontiguousarray(array)).cast("B")
        with open(path, "wb") as f:
            f.write(raw[: len(raw) // 2])
            f.flush()
            os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def run_kills(specs):
    """In a fresh process: fork one writer per spec, kill it as the spec says, print the
    exit statuses. spec: {"dir", "mode", "op", "n"} or {"dir", "mode", "after_s"} (a kill
    from outside after that many seconds)."""
    feed, statuses = Feed(), []
    for spec in specs:
        pid = os.fork()
        if pid == 0:  # the writer
            code = 0
            try:
                if "op" in spec:
                    arm(spec["op"], spec["n"], die)
                feed.run(feed.open(spec["dir"], spec["mode"]), spec["mode"], delay=0.03 if "after_s" in spec else 0)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        if "after_s" in spec:
            time.sleep(spec["after_s"])
            os.kill(pid, signal.SIGKILL)
        statuses.append(os.waitpid(pid, 0)[1])
    print(json.dumps(statuses))


def count_events(tmp, mode):
    """How often an uninterrupted run does each operation (the range of random kill points)."""
    saved = os.fsync, os.replace, StoreMetadata.write, writer_mod._write_durably
    try:
        counted = {op: arm(op, -1, None) for op in ("fsync", "replace", "meta", "write")}
        uninterrupted(Feed(), tmp / f"count-{mode}", mode)
    finally:
        os.fsync, os.replace, StoreMetadata.write, writer_mod._write_durably = saved
    return {op: count[0] for op, count in counted.items()}


def test_sigkilled_writer_resumes_to_the_same_content_hash(tmp_path):
    feed = Feed()
    modes = ("progress", "tokens")
    reference = {mode: uninterrupted(feed, tmp_path / f"ref-{mode}", mode).content_hash for mode in modes}
    assert reference["progress"] != reference["tokens"]  # other shard boundaries: the modes really differ
    specs = [  # chosen points: a shard half written, between a shard and its meta.json, inside meta.json's write
        {"mode": "progress", "op": "write", "n": 3}, {"mode": "progress", "op": "meta", "n": 3},
        {"mode": "progress", "op": "replace", "n": 6}, {"mode": "tokens", "op": "write", "n": 6},
        {"mode": "tokens", "op": "meta", "n": 1}, {"mode": "progress", "op": "fsync", "n": 9},
    ]
    counts = {mode: count_events(tmp_path, mode) for mode in modes}
    for seed in range(4):  # random points
        rng = random.Random(seed)
        mode, op = rng.choice(modes), rng.choice(sorted(counts["progress"]))
        specs.append({"mode": mode, "op": op, "n": rng.randint(1, counts[mode][op])})
    specs += [{"mode": m, "after_s": random.Random(s).uniform(0.02, 0.15)} for s, m in enumerate(modes)]
    for i, spec in enumerate(specs):
        spec["dir"] = str(tmp_path / f"killed-{i}")
    proc = subprocess.run([sys.executable, "-c", f"import sys, json; sys.path.insert(0, {str(TESTS)!r}); "
                           f"from test_faults_store import run_kills; run_kills(json.loads(sys.argv[1]))",
                           json.dumps(specs)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec, status in zip(specs, statuses):
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        finished = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert killed or ("after_s" in spec and finished), f"{spec}: the writer was not killed (status {status})"
        directory = Path(spec["dir"])
        if killed and (directory / "meta.json").exists():  # every committed shard is whole and verifies
            with pytest.raises(StoreIncompleteError, match="did not finish"):
                ActivationStore(directory)
            ActivationStore(directory, allow_incomplete=True, verify=True)
        if killed:
            feed.run(feed.open(directory, spec["mode"]), spec["mode"])
        store = ActivationStore(directory, verify=True)
        assert store.content_hash == reference[spec["mode"]], spec
        assert store.image_paths == [feed.path(i) for i in range(feed.images)]
        assert not list(directory.glob("*.partial")) and not list(directory.glob(".meta.json.tmp-*"))


def hold_writer(directory):
    """In a fresh process: write half, say "ready", wait for a line on stdin, finish."""
    feed = Feed()
    writer = feed.open(directory, "progress", resume=False)
    for first in range(0, feed.images // 2, feed.batch):
        ids = list(range(first, first + feed.batch))
        writer.add_image_paths([feed.path(i) for i in ids])
        writer.add(np.concatenate([feed.acts(i) for i in ids]), np.repeat(ids, feed.tokens),
                   np.tile(np.arange(feed.tokens), len(ids)))
        writer.flush({"next_image": first + feed.batch})
    print("ready", flush=True)
    sys.stdin.readline()
    feed.run(writer, "progress")
    print("done", flush=True)


def test_second_writer_fails_at_once_and_the_first_finishes_intact(tmp_path):
    feed = Feed()
    reference = uninterrupted(feed, tmp_path / "ref", "progress").content_hash
    directory = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
                             f"from test_faults_store import hold_writer; hold_writer(sys.argv[1])", str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() else ""
        holder = f"pid {proc.pid} on"
        for resume in (True, False):
            start = time.perf_counter()
            with pytest.raises(LockedError, match=holder):
                feed.open(directory, "progress", resume=resume)
            assert time.perf_counter() - start < 1.0  # at once, no waiting for the lock
        with pytest.raises(StoreIncompleteError, match=f"being written by {holder}"):
            ActivationStore(directory)
        snapshot = ActivationStore(directory, allow_incomplete=True, verify=True)
        assert snapshot.n_tokens == feed.images // 2 * feed.tokens
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = ActivationStore(directory, verify=True)
    assert store.content_hash == reference  # the second writers' attempts changed nothing


# -- disk full -------------------------------------------------------------------------------
def assert_nothing_half_written(directory):
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".partial") or ".tmp-" in p.name]
    assert not leftovers, leftovers
    committed = ActivationStore(directory, allow_incomplete=True, verify=True)  # every listed byte verifies
    images = directory / "images.jsonl"
    assert (images.stat().st_size if images.exists() else 0) == committed.meta.images.bytes
    return committed


def test_disk_full_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        feed = Feed(d=256, tokens=64, images=80, batch=4)  # 32 KiB of fp16 per image: 2.6 MiB in all
        directory = mount / "s"
        writer = feed.open(directory, "progress", resume=False)
        with pytest.raises(DiskFullError, match="the disk is full") as caught:
            feed.run(writer, "progress")
        assert caught.value.errno == errno.ENOSPC
        writer.abort()
        assert 0 < assert_nothing_half_written(directory).meta.progress["next_image"] < feed.images
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)  # free space, then resume
        feed.run(feed.open(directory, "progress"), "progress")
        expected = uninterrupted(feed, tmp_path / "ref", "progress").content_hash
        assert ActivationStore(directory, verify=True).content_hash == expected
    finally:
        gc.collect()  # no store's memory maps may keep the mount busy
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def enospc_shard_write(monkeypatch):
    real = writer_mod._write_durably
    calls = [0]

    def write(path, array):
        calls[0] += 1
        if calls[0] == 4:  # the .src of the 2nd commit's shard: its .bin is already renamed into place
            path.write_bytes(b"\0" * 5)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, array)
    monkeypatch.setattr(writer_mod, "_write_durably", write)


def enospc_images_append(monkeypatch):
    real = images_mod.ImagePathLog.append

    def append(self, lines, count):
        if self.committed.count:  # the 2nd commit's paths: half of them reach the file
            with open(self.path, "ab") as f:
                f.write(lines[: len(lines) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, lines, count)
    monkeypatch.setattr(images_mod.ImagePathLog, "append", append)


def enospc_meta_write(monkeypatch):
    real = Path.write_bytes
    calls = [0]

    def write_bytes(self, data):
        if self.name.startswith(".meta.json.tmp-"):
            calls[0] += 1
            if calls[0] == 3:  # creation, 1st commit, then the 2nd commit's meta.json
                real(self, data[:10])
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("fault", [enospc_shard_write, enospc_images_append, enospc_meta_write])
@pytest.mark.parametrize("then", ["retry", "resume"])
def test_enospc_at_each_write_of_a_commit(tmp_path, monkeypatch, fault, then):
    """The CPU counterpart of the tmpfs test: ENOSPC at the shard, image-path and meta.json
    writes of the 2nd commit."""
    feed = Feed()
    expected = uninterrupted(feed, tmp_path / "ref", "progress").content_hash
    directory = tmp_path / "s"
    fault(monkeypatch)
    writer = feed.open(directory, "progress", resume=False)
    with pytest.raises(DiskFullError, match="the disk is full"):
        feed.run(writer, "progress")
    monkeypatch.undo()  # space was freed
    committed = assert_nothing_half_written(directory)
    assert committed.n_tokens == feed.batch * feed.tokens and committed.meta.progress == {"next_image": feed.batch}
    assert writer.progress == committed.meta.progress and writer.n_images == 2 * feed.batch  # the pending batch
    if then == "retry":  # the same writer commits what it holds, then goes on
        writer.flush({"next_image": 2 * feed.batch})
    else:
        writer.abort()
        writer = feed.open(directory, "progress")
    feed.run(writer, "progress")
    assert ActivationStore(directory, verify=True).content_hash == expected
