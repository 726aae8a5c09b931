"""Hostile inputs to the activation store (issue 14, classes 2, 6, 7, 8): every bad write,
every damaged or edited file and every bad read gives a clear error with the words a user
needs, or a documented behaviour. One case per row of the table."""

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
from hostile import case, hostile_table

from saeengine.errors import (ConfigError, DataMismatchError, InputError, LockedError, NonFiniteError,
                              StoreCorruptError, StoreError, StoreIncompleteError)
from saeengine.store import ActivationLoader, ActivationStore, ActivationWriter, batch_positions
from saeengine.store.metadata import ImagesInfo, ShardInfo, StoreMetadata

D = 8
N = 40  # tokens of the small store: 4 images x 10 patches, shards of 16 (16 + 16 + 8)
PATHS = [f"class_{i % 2}/img_{i}.jpg" for i in range(4)]


def acts(n, d=D, scale=1.0):
    return (torch.arange(n * d, dtype=torch.float32).reshape(n, d) / (n * d) - 0.5) * scale


def writer(tmp, **kw):
    kw.setdefault("d_in", D)
    kw.setdefault("dtype", "float32")
    return ActivationWriter(tmp / "s", **kw)


def add_one(tmp, rows, image_index=None, position=None, **kw):
    """Add rows to a fresh writer (then drop it) and return what add() raised or did."""
    w = writer(tmp, **kw)
    try:
        n = rows.shape[0] if hasattr(rows, "shape") and len(rows.shape) else 1
        image_index = np.arange(n) if image_index is None else image_index
        position = np.zeros(n, dtype=np.int64) if position is None else position
        w.add(rows, image_index, position)
        w.close()
        return ActivationStore(tmp / "s")
    finally:
        w.abort()


def small_store(tmp, *, complete=True, paths=True, dtype="float32") -> Path:
    w = writer(tmp, dtype=dtype, shard_tokens=16, backbone="tiny", layer="blocks.1", token_kind="patch")
    if paths:
        w.add_image_paths(PATHS)
    t = np.arange(N)
    w.add(acts(N), t // 10, t % 10)
    if complete:
        w.close()
    else:
        w.flush({"images_done": 4})
        w.abort()  # as a killed writer leaves it: committed, unlocked, unfinished
    return tmp / "s"


def checksum(body):
    """meta.json's checksum, recomputed here from the documented recipe (blake2b-128 of
    the canonical JSON of every other field)."""
    rest = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def edited(tmp, change, *, reseal=False, content=False, **store_kw):
    """A small store whose meta.json got ``change(body)``; ``reseal`` also fixes the
    checksum (and ``content`` the content hash), as a careful editor would."""
    directory = small_store(tmp, **store_kw)
    path = directory / "meta.json"
    body = json.loads(path.read_text())
    change(body)
    if content:
        fields = ("d_in", "dtype", "backbone", "layer", "token_kind", "extra")
        meta = StoreMetadata(**{f: body[f] for f in fields}, shards=[ShardInfo(**s) for s in body["shards"]],
                             images=ImagesInfo(**body["images"]))
        body["content_hash"] = meta.compute_content_hash()
    if reseal:
        body["checksum"] = checksum(body)
    path.write_text(json.dumps(body, indent=1))
    return ActivationStore(directory)


def damaged(tmp, filename, damage, read=None, **open_kw):
    directory = small_store(tmp)
    path = directory / filename
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(damage(data)))
    store = ActivationStore(directory, **open_kw)
    return read(store) if read else store


def flip(offset):
    def damage(data):
        data[offset] ^= 0x40
        return data
    return damage


def set_field(key, value):
    return lambda body: body.__setitem__(key, value)


def held(tmp, then):
    """Run ``then(tmp)`` while a writer of tmp/s is open (holding the store's lock)."""
    first = writer(tmp)
    try:
        first.add(acts(4), [0, 0, 1, 1], [0, 1, 0, 1])
        first.flush()
        return then(tmp)
    finally:
        first.abort()


def v1_store(tmp, complete=True) -> Path:
    """A store as saeengine wrote it before format version 2 (int32 sources, no checksum)."""
    directory = tmp / "v1"
    directory.mkdir()
    data = acts(6).numpy()
    src = np.stack([np.arange(6) // 3, np.arange(6) % 3], axis=1).astype("<i4")
    (directory / "shard-00000.bin").write_bytes(data.tobytes())
    (directory / "shard-00000.src").write_bytes(src.tobytes())
    digest = hashlib.blake2b(data.tobytes() + src.tobytes(), digest_size=16).hexdigest()
    identity = {"d_in": D, "dtype": "float32", "backbone": "b", "layer": "l", "token_kind": "patch", "extra": {}}
    h = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16)
    h.update(f"6:{digest}".encode())
    body = {"format": "saeengine-activations", "version": 1, **identity,
            "shards": [{"name": "shard-00000", "tokens": 6, "blake2b": digest}], "complete": complete,
            "content_hash": h.hexdigest() if complete else None, "n_tokens": 6}
    (directory / "meta.json").write_text(json.dumps(body))
    return directory


def check_v1(store, tmp):
    image, position = store.sources(np.arange(6))
    assert image.tolist() == [0, 0, 0, 1, 1, 1] and position.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(store.get([5]), acts(6)[5:])
    assert store.image_paths == []


def check_wide_index(store, tmp):
    image, position = store.sources([0, 1])
    assert image.tolist() == [2**31 + 5, 2**40] and position.tolist() == [2**31, 3]  # no wrap at 2^31


def check_fp16_edge(store, tmp):
    assert store.get([0])[0, 0].item() == 65504.0  # 65510 rounds to fp16's largest, not to inf


def check_snapshot(store, tmp):
    assert store.n_tokens == 4 and not store.meta.complete


def check_unsafe(result, tmp):
    assert not torch.equal(result, acts(N)[:16])  # verify=False: the flipped byte is read silently


def check_resume_cleanup(w, tmp):
    try:
        d = tmp / "s"
        assert not list(d.glob("*.partial")) and not (d / "shard-00009.bin").exists()
        assert (d / "images.jsonl").stat().st_size == w.meta.images.bytes  # the uncommitted tail is gone
        assert w.n_tokens == N and w.n_images == 4 and w.progress == {"images_done": 4}
    finally:
        w.abort()


def leftovers_then_resume(tmp):
    d = small_store(tmp, complete=False)
    (d / "shard-00009.bin").write_bytes(b"\0" * 64)         # renamed but never committed
    (d / "shard-00003.src.partial").write_bytes(b"\0" * 7)  # killed inside a shard write
    with open(d / "images.jsonl", "ab") as f:
        f.write(b'"uncommitted.jpg"\n')
    return ActivationWriter(d, resume=True)


def first_batch(store):
    return next(iter(ActivationLoader(store, 8, seed=0)))


def reseal_swap(body):
    body["d_in"], body["dtype"] = 16, "float16"  # the same bytes per token: 8 x 4 == 16 x 2


def drop_last_shard(body):
    gone = body["shards"].pop()
    body["n_tokens"] -= gone["tokens"]


NAN = acts(4).index_put_((torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan")))
INF = acts(4).index_put_((torch.tensor([1]), torch.tensor([0])), torch.tensor(float("inf")))
BIG = acts(4).index_put_((torch.tensor([3]), torch.tensor([5])), torch.tensor(70000.0))
PID = f"pid {os.getpid()} on {socket.gethostname()}"

CASES = [
    # -- write side: non-finite values and overflow (class 2) ---------------------------------
    case("nan-row", lambda t: add_one(t, NAN, [5, 6, 7, 8], [0, 1, 2, 3]), NonFiniteError,
         "NaN or inf", "1 of 4 rows", "row 2", "image 7", "position 2", "drop those rows"),
    case("inf-row", lambda t: add_one(t, INF, [5, 6, 7, 8]), NonFiniteError, "NaN or inf", "row 1", "image 6"),
    case("neg-inf-numpy", lambda t: add_one(t, -INF.numpy()), NonFiniteError, "NaN or inf"),
    case("fp16-overflow", lambda t: add_one(t, BIG, [1, 2, 3, 4], dtype="float16"), NonFiniteError,
         "overflow float16", "max |value| 70000", "65504", "image 4", "dtype='bfloat16' or 'float32'"),
    case("fp16-edge-rounds-not-inf", lambda t: add_one(t, torch.full((1, D), 65510.0), dtype="float16"), None,
         check=check_fp16_edge),
    case("fp32-overflow-from-fp64", lambda t: add_one(t, torch.full((2, D), 1e39, dtype=torch.float64)),
         NonFiniteError, "overflow float32", "2 of 2 rows", "scale the activations down"),
    case("bf16-overflow", lambda t: add_one(t, torch.full((1, D), 3.4e38), dtype="bfloat16"), NonFiniteError,
         "overflow bfloat16", "dtype='float32'"),
    # -- write side: shapes and dtypes of activations and sources --------------------------
    case("acts-wrong-width", lambda t: add_one(t, torch.zeros(5, 7)), InputError, "[n, 8]", "(5, 7)"),
    case("acts-1d", lambda t: add_one(t, torch.zeros(D)), InputError, "[n, 8]", "(8,)"),
    case("acts-3d", lambda t: add_one(t, torch.zeros(2, 3, D)), InputError, "[n, 8]", "(2, 3, 8)"),
    case("acts-int-tensor", lambda t: add_one(t, torch.zeros(2, D, dtype=torch.int64)), InputError,
         "floating point", "torch.int64", ".float()"),
    case("acts-bool-tensor", lambda t: add_one(t, torch.zeros(2, D, dtype=torch.bool)), InputError, "floating point"),
    case("acts-int-numpy", lambda t: add_one(t, np.zeros((2, D), dtype=np.int32)), InputError,
         "floating point", "int32", "astype(np.float32)"),
    case("acts-list", lambda t: add_one(t, [[0.0] * D]), InputError, "torch.tensor or numpy array", "list"),
    case("index-wrong-length", lambda t: add_one(t, acts(5), np.zeros(4, dtype=int)), InputError,
         "image_index has 4 entries for 5"),
    case("position-wrong-length", lambda t: add_one(t, acts(3), [0, 1, 2], [0]), InputError,
         "position has 1 entries for 3"),
    case("float-image-index", lambda t: add_one(t, acts(2), np.array([0.0, 1.7])), InputError,
         "image_index must be integers", "float64", "truncated"),
    case("float-position-tensor", lambda t: add_one(t, acts(2), [0, 1], torch.tensor([0.5, 1.0])), InputError,
         "position must be integers", "float32"),
    case("bool-image-index", lambda t: add_one(t, acts(2), np.array([True, False])), InputError,
         "image_index must be integers", "bool"),
    case("string-position", lambda t: add_one(t, acts(1), [0], ["3"]), InputError, "position must be integers"),
    case("negative-image-index", lambda t: add_one(t, acts(3), [0, -1, -2]), InputError,
         "image_index must be >= 0", "-2", "2 negative entries", "row 1"),
    case("negative-position", lambda t: add_one(t, acts(1), [0], [-7]), InputError, "position must be >= 0"),
    case("index-beyond-int64", lambda t: add_one(t, acts(1), np.array([2**63], dtype=np.uint64)), InputError,
         "image_index 9223372036854775808 is too large", "at most 9223372036854775807"),
    case("index-python-int-2-70", lambda t: add_one(t, acts(1), [2**70]), InputError,
         "image_index must be integers", "too large for int64"),
    case("index-above-2-31-kept-exact", lambda t: add_one(t, acts(2), [2**31 + 5, 2**40], [2**31, 3]), None,
         check=check_wide_index),
    # -- image paths and progress (class 8, store side) ----------------------------------
    case("index-without-image-path", lambda t: (lambda w: (w.add_image_paths(["a.jpg", "b.jpg"]),
                                                           w.add(acts(2), [1, 2], [0, 0])))(writer(t)),
         InputError, "image_index 2 has no image path", "2 paths were added", "add_image_paths()"),
    case("image-paths-a-string", lambda t: writer(t).add_image_paths("a.jpg"), InputError,
         "sequence of strings", "got a str", "pass a list"),
    case("image-path-not-a-string", lambda t: writer(t).add_image_paths(["a.jpg", Path("b.jpg")]), InputError,
         "image path 1", "non-empty string"),
    case("image-path-empty", lambda t: writer(t).add_image_paths([""]), InputError, "image path 0", "non-empty"),
    case("progress-not-json", lambda t: writer(t).flush({"when": object()}), InputError,
         "progress must hold only JSON"),
    case("progress-nan", lambda t: writer(t).flush({"loss": float("nan")}), InputError, "progress", "no NaN"),
    case("progress-not-a-dict", lambda t: writer(t).flush([1, 2]), InputError, "progress must be a dict", "list"),
    case("extra-not-json", lambda t: writer(t, extra={"f": {1, 2}}), InputError, "extra must hold only JSON"),
    # -- writer arguments ---------------------------------------------------------------------
    case("unknown-dtype", lambda t: writer(t, dtype="int8"), ConfigError, "dtype 'int8' is not supported",
         "bfloat16", "float16", "float32"),
    case("d-in-zero", lambda t: writer(t, d_in=0), ConfigError, "d_in must be an integer >= 1", "got 0"),
    case("d-in-float", lambda t: writer(t, d_in=8.0), ConfigError, "d_in must be an integer >= 1", "8.0"),
    case("d-in-missing", lambda t: ActivationWriter(t / "s"), ConfigError, "d_in is required"),
    case("shard-tokens-zero", lambda t: writer(t, shard_tokens=0), ConfigError, "shard_tokens must be an integer >= 1"),
    case("resume-not-bool", lambda t: writer(t, resume="yes"), ConfigError, "resume must be True or False"),
    case("directory-is-a-file", lambda t: (t / "s").write_text("x") and writer(t), StoreError, "is a file"),
    case("not-empty-without-resume", lambda t: small_store(t, complete=False) and writer(t), StoreError,
         "not empty", "resume=True"),
    case("resume-other-d-in", lambda t: small_store(t, complete=False) and writer(t, d_in=16, resume=True),
         StoreError, "d_in=16, dtype='float32'", "holds d_in=8, dtype='float32'", "d_in=None"),
    case("resume-other-dtype", lambda t: small_store(t, complete=False) and writer(t, dtype="float16", resume=True),
         StoreError, "dtype='float16'", "dtype='float32'"),
    case("resume-other-layer", lambda t: small_store(t, complete=False) and writer(t, layer="blocks.9", resume=True),
         StoreError, "layer='blocks.9'", "layer='blocks.1'"),
    case("resume-in-a-non-store-folder", lambda t: (t / "s").mkdir() or (t / "s" / "notes.txt").write_text("x")
         and writer(t, resume=True), StoreError, "cannot resume", "no meta.json", "not an activation store"),
    case("resume-complete-store", lambda t: small_store(t) and writer(t, resume=True), StoreError, "already complete"),
    case("resume-discards-unfinished-commit", leftovers_then_resume, None, check=check_resume_cleanup),
    case("resume-v1-store", lambda t: ActivationWriter(v1_store(t, complete=False), resume=True), StoreError,
         "format version 1", "re-record it"),
    case("add-after-close", lambda t: (lambda w: (w.close(), w.add(acts(1), [0], [0])))(writer(t)), StoreError,
         "is closed", "resume=True"),
    # -- concurrent use (class 7) -------------------------------------------------------------
    case("second-writer", lambda t: held(t, lambda t: writer(t)), LockedError, "activation store", PID),
    case("second-writer-resume", lambda t: held(t, lambda t: writer(t, resume=True)), LockedError, PID,
         "wait for it to finish"),
    case("read-while-written", lambda t: held(t, lambda t: ActivationStore(t / "s")), StoreIncompleteError,
         f"is being written by {PID}", "4 tokens committed", "allow_incomplete=True"),
    case("read-while-written-snapshot", lambda t: held(t, lambda t: ActivationStore(t / "s", allow_incomplete=True)),
         None, check=check_snapshot),
    case("read-killed-writer", lambda t: ActivationStore(small_store(t, complete=False)), StoreIncompleteError,
         "did not finish", "40 tokens", "resume=True"),
    # -- metadata: missing, malformed, every field edited (class 6) -----------------------------
    case("meta-missing", lambda t: ActivationStore(t), StoreError, "meta.json is missing"),
    case("meta-not-json", lambda t: (t / "meta.json").write_text("{oops") and ActivationStore(t), StoreCorruptError,
         "not valid JSON", "restore the original meta.json"),
    case("meta-a-list", lambda t: (t / "meta.json").write_text("[]") and ActivationStore(t), StoreError,
         "not a saeengine activation store"),
    case("meta-other-format", lambda t: edited(t, set_field("format", "safetensors")), StoreError,
         "format='safetensors'"),
    case("meta-future-version", lambda t: edited(t, set_field("version", 3)), StoreError, "format version 3",
         "upgrade saeengine"),
    case("meta-version-string", lambda t: edited(t, set_field("version", "2")), StoreError, "format version '2'"),
    case("meta-dtype-d-in-swapped", lambda t: edited(t, reseal_swap), StoreCorruptError,
         "changed after it was written", "restore the original meta.json"),
    case("meta-dtype-d-in-swapped-resealed", lambda t: edited(t, reseal_swap, reseal=True), StoreCorruptError,
         "'content_hash'", "hash of the metadata"),
    case("meta-backbone-edited", lambda t: edited(t, set_field("backbone", "other")), StoreCorruptError,
         "changed after it was written"),
    case("meta-extra-edited", lambda t: edited(t, set_field("extra", {"image_size": 448})), StoreCorruptError,
         "changed after it was written"),
    case("meta-d-in-negative", lambda t: edited(t, set_field("d_in", -8)), StoreCorruptError,
         "field 'd_in' is -8", "integer >= 1"),
    case("meta-d-in-string", lambda t: edited(t, set_field("d_in", "8")), StoreCorruptError, "field 'd_in' is '8'"),
    case("meta-d-in-bool", lambda t: edited(t, set_field("d_in", True)), StoreCorruptError, "field 'd_in' is True"),
    case("meta-dtype-unknown", lambda t: edited(t, set_field("dtype", "int8")), StoreCorruptError,
         "field 'dtype' is 'int8'", "float16"),
    case("meta-layer-not-string", lambda t: edited(t, set_field("layer", 3)), StoreCorruptError,
         "field 'layer' is 3", "a string"),
    case("meta-extra-not-object", lambda t: edited(t, set_field("extra", [])), StoreCorruptError, "field 'extra'"),
    case("meta-shards-reordered", lambda t: edited(t, lambda b: b["shards"].reverse()), StoreCorruptError,
         "shards[0].name", "'shard-00000'"),
    case("meta-shard-tokens-edited", lambda t: edited(t, lambda b: b["shards"][1].__setitem__("tokens", 17)),
         StoreCorruptError, "field 'n_tokens' is 40", "41"),
    case("meta-shard-tokens-edited-resealed",
         lambda t: edited(t, lambda b: (b["shards"][1].__setitem__("tokens", 8), b.__setitem__("n_tokens", 32)),
                          reseal=True, content=True),
         StoreCorruptError, "shard-00001.bin is 512 bytes", "8 tokens (256 bytes)"),
    case("meta-shard-tokens-zero", lambda t: edited(t, lambda b: b["shards"][2].__setitem__("tokens", 0)),
         StoreCorruptError, "shards[2].tokens", ">= 1"),
    case("meta-shard-digest-not-hex", lambda t: edited(t, lambda b: b["shards"][0].__setitem__("blake2b", "xyz")),
         StoreCorruptError, "shards[0].blake2b", "32 hex digits"),
    case("meta-shard-dropped-resealed", lambda t: edited(t, drop_last_shard, reseal=True, content=True),
         StoreCorruptError, "shard-00002.bin is not listed in meta.json", "remove the stray file"),
    case("meta-unknown-field", lambda t: edited(t, set_field("owner", "me")), StoreCorruptError,
         "unknown fields ['owner']"),
    case("meta-field-removed", lambda t: edited(t, lambda b: b.pop("progress")), StoreCorruptError,
         "lacks ['progress']"),
    case("meta-checksum-removed", lambda t: edited(t, lambda b: b.pop("checksum")), StoreCorruptError,
         "lacks ['checksum']"),
    case("meta-complete-string", lambda t: edited(t, set_field("complete", "yes")), StoreCorruptError,
         "field 'complete'", "true or false"),
    case("meta-content-hash-edited", lambda t: edited(t, set_field("content_hash", "0" * 32), reseal=True),
         StoreCorruptError, "field 'content_hash'"),
    case("meta-incomplete-with-hash",
         lambda t: edited(t, set_field("content_hash", "0" * 32), reseal=True, complete=False), StoreCorruptError,
         "null while the store is incomplete"),
    case("meta-source-dtype-int32", lambda t: edited(t, set_field("source_dtype", "int32")), StoreCorruptError,
         "field 'source_dtype' is 'int32'", "'int64'"),
    case("meta-images-count-edited", lambda t: edited(t, lambda b: b["images"].__setitem__("count", 400)),
         StoreCorruptError, "images.bytes", "400 image paths"),
    case("meta-nan-value", lambda t: edited(t, set_field("progress", {"x": float("nan")}), complete=False),
         StoreCorruptError, "field 'checksum'", "valid JSON"),
    # -- shard and image files damaged (class 6) ----------------------------------------------
    case("flipped-bin-first-read", lambda t: damaged(t, "shard-00001.bin", flip(100), lambda s: s.get([20])),
         StoreCorruptError, "shard-00001.bin / shard-00001.src: checksum mismatch", "re-record the store"),
    case("flipped-src-first-read", lambda t: damaged(t, "shard-00002.src", flip(3), lambda s: s.sources([35])),
         StoreCorruptError, "shard-00002.bin / shard-00002.src: checksum mismatch"),
    case("flipped-bin-in-loader", lambda t: damaged(t, "shard-00000.bin", flip(7), first_batch), StoreCorruptError,
         "shard-00000.bin", "checksum mismatch"),
    case("flipped-bin-verify-all", lambda t: damaged(t, "shard-00002.bin", flip(0), verify=True), StoreCorruptError,
         "shard-00002.bin", "checksum mismatch"),
    case("flipped-bin-verify-false-unsafe",
         lambda t: damaged(t, "shard-00000.bin", flip(0), lambda s: s.get(np.arange(16)), verify=False), None,
         check=check_unsafe),
    case("verify-bad-value", lambda t: ActivationStore(small_store(t), verify="yes"), InputError,
         "verify must be 'once'", "True", "False"),
    case("truncated-bin", lambda t: damaged(t, "shard-00001.bin", lambda d: d[:-4]), StoreCorruptError,
         "shard-00001.bin is 508 bytes", "16 tokens (512 bytes)", "truncated"),
    case("truncated-src", lambda t: damaged(t, "shard-00002.src", lambda d: d[:-16]), StoreCorruptError,
         "shard-00002.src is 112 bytes", "8 tokens (128 bytes)"),
    case("extended-bin", lambda t: damaged(t, "shard-00000.bin", lambda d: d + b"\0" * 32), StoreCorruptError,
         "shard-00000.bin is 544 bytes", "extended"),
    case("missing-bin", lambda t: (os.remove(small_store(t) / "shard-00001.bin"), ActivationStore(t / "s")),
         StoreCorruptError, "shard-00001.bin is missing"),
    case("missing-src", lambda t: (os.remove(small_store(t) / "shard-00000.src"), ActivationStore(t / "s")),
         StoreCorruptError, "shard-00000.src is missing"),
    case("stray-shard-file", lambda t: ((small_store(t) / "shard-00007.bin").write_bytes(b"x"),
                                        ActivationStore(t / "s")),
         StoreCorruptError, "shard-00007.bin is not listed", "remove the stray file"),
    case("images-truncated", lambda t: damaged(t, "images.jsonl", lambda d: d[:-5]), StoreCorruptError,
         "images.jsonl is", "4 image paths", "truncated"),
    case("images-missing", lambda t: (os.remove(small_store(t) / "images.jsonl"), ActivationStore(t / "s")),
         StoreCorruptError, "images.jsonl is 0 bytes", "missing"),
    case("images-flipped", lambda t: damaged(t, "images.jsonl", flip(4), lambda s: s.image_path(0)),
         StoreCorruptError, "images.jsonl: checksum mismatch"),
    case("images-extended-finished-store", lambda t: damaged(t, "images.jsonl", lambda d: d + b'"x.jpg"\n'),
         StoreCorruptError, "images.jsonl is", "extended"),
    # -- reads out of range --------------------------------------------------------------
    case("get-out-of-range", lambda t: ActivationStore(small_store(t)).get([3, 40]), InputError,
         "token ids must be in [0, 40)", "3..40"),
    case("get-negative", lambda t: ActivationStore(small_store(t)).get([-1]), InputError, "[0, 40)", "-1"),
    case("get-float-rows", lambda t: ActivationStore(small_store(t)).get(np.array([1.9])), InputError,
         "token ids must be integers", "float64"),
    case("get-bool-mask", lambda t: ActivationStore(small_store(t)).get(torch.ones(40, dtype=torch.bool)), InputError,
         "token ids must be integers", "bool"),
    case("sources-out-of-range", lambda t: ActivationStore(small_store(t)).sources([100]), InputError, "[0, 40)"),
    case("image-path-out-of-range", lambda t: ActivationStore(small_store(t)).image_path(4), InputError,
         "image index 4 is out of range", "4 image paths", "indices 0..3"),
    case("image-path-negative", lambda t: ActivationStore(small_store(t)).image_path(-1), InputError,
         "image index -1 is out of range"),
    case("image-path-float", lambda t: ActivationStore(small_store(t)).image_path(1.0), InputError,
         "must be an integer", "1.0"),
    case("image-path-none-recorded", lambda t: ActivationStore(small_store(t, paths=False)).image_path(0), InputError,
         "records no image paths"),
    case("v1-store-reads", lambda t: ActivationStore(v1_store(t)), None, check=check_v1),
    # -- loader -----------------------------------------------------------------------------
    case("loader-batch-larger-than-store", lambda t: ActivationLoader(small_store(t), 64), ConfigError,
         "batch_size=64 is larger than the 40 tokens", "drop_last=False"),
    case("loader-batch-zero", lambda t: ActivationLoader(small_store(t), 0), ConfigError,
         "batch_size must be an integer >= 1"),
    case("loader-state-other-store",
         lambda t: ActivationLoader(small_store(t), 8).load_state_dict({"content_hash": "0" * 32, "batch_size": 8}),
         DataMismatchError, "another store", "0" * 32),
    case("positions-no-full-batch-no-hang", lambda t: next(batch_positions(10, 64, 0, epochs=None)), ConfigError,
         "batch_size=64 is larger than the data's 10 tokens"),
]

test_hostile = hostile_table(CASES)


def test_table_covers_the_store_classes():
    assert len(CASES) >= 40
    errors = {c.error for c in CASES}
    assert {NonFiniteError, InputError, StoreCorruptError, LockedError, StoreIncompleteError} <= errors
