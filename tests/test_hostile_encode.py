"""Hostile inputs to the encode pass and its reader (issue 15): an SAE of another width or
layer than the store, unfinished or unordered stores, bad settings, output folders that
are files, other folders, locked, or another SAE's encoding, damaged resume state, and bad
reader arguments. Each is a clear error naming the problem and the fix, or a documented
behaviour checked here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from encode_helpers import make_sae, make_store
from hostile import case, hostile_table

from saeengine._lock import exclusive_lock
from saeengine.errors import (CheckpointError, ConfigError, DataError, DataMismatchError, InputError, LockedError,
                              StoreCorruptError, StoreError, StoreIncompleteError)
from saeengine.eval import encode as encode_module
from saeengine.eval.encode import encode_store
from saeengine.eval.encoded import EncodedDataset
from saeengine.store import ActivationStore, ActivationWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def enc(tmp: Path, sae=None, store=None, out="out", **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("top_k", 3)
    if store is None:  # one store per case, made on the first call
        store = tmp / "store" if (tmp / "store").exists() else make_store(tmp / "store", 6)
    return encode_store(make_sae() if sae is None else sae, store, tmp / out, **kwargs)


def finished(tmp: Path) -> EncodedDataset:
    return enc(tmp)


def unfinished(tmp: Path, fail_after: int = 2) -> Path:
    """An encoding that stopped after ``fail_after`` committed batches."""
    real = encode_module.make_accumulators

    class Stop:
        seen = 0

        def update(self, batch):
            Stop.seen += 1
            if Stop.seen > fail_after:
                raise RuntimeError("stop")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    saved = encode_module.COMMIT_EVERY_S, encode_module.make_accumulators
    encode_module.COMMIT_EVERY_S = 0.0
    encode_module.make_accumulators = lambda d, k: {**real(d, k), "stop": Stop()}
    try:
        enc(tmp, batch_tokens=8)
    except RuntimeError:
        pass
    finally:
        encode_module.COMMIT_EVERY_S, encode_module.make_accumulators = saved
    return tmp / "out"


# ----- the SAE against the store ---------------------------------------------------------------
def other_d_in(tmp):
    return enc(tmp, sae=make_sae(d_in=8))


def layer_from_metadata(tmp):
    return enc(tmp, sae=make_sae(metadata={"layer": "blocks.7"}))


def layer_from_provenance(tmp):
    make_sae().save(tmp / "sae", provenance={"store": {"layer": "blocks.9", "backbone": "tiny"}})
    return enc(tmp, sae=tmp / "sae", device="cpu")


def backbone_from_metadata(tmp):
    return enc(tmp, sae=make_sae(metadata={"backbone": "dinov2", "layer": "blocks.3"}))


def encoded_fine(result, tmp):
    assert isinstance(result, EncodedDataset) and result.n_tokens == ActivationStore(tmp / "store").n_tokens


# ----- the store -------------------------------------------------------------------------------
def unfinished_store(tmp):
    return enc(tmp, store=make_store(tmp / "store", 4, close=False))


def unfinished_store_object(tmp):
    return enc(tmp, store=ActivationStore(make_store(tmp / "store", 4, close=False), allow_incomplete=True))


def store_being_written(tmp):
    writer = ActivationWriter(tmp / "store", d_in=16, dtype="float16")
    writer.add(np.ones((2, 16), np.float32), [0, 0], [0, 1])
    writer.flush()
    try:
        return enc(tmp, store=tmp / "store")
    finally:
        writer.abort()


def unordered_images(tmp):
    with ActivationWriter(tmp / "store", d_in=16, dtype="float16") as writer:
        for image in (0, 1, 0):  # image 0's tokens are split by image 1's
            writer.add(np.random.default_rng(image).normal(size=(3, 16)).astype(np.float32), [image] * 3, [0, 1, 2])
    return enc(tmp, store=tmp / "store", batch_tokens=4)


def decreasing_images(tmp):
    with ActivationWriter(tmp / "store", d_in=16, dtype="float16") as writer:
        for image in (2, 1):
            writer.add(np.ones((2, 16), np.float32), [image] * 2, [0, 1])
    return enc(tmp, store=tmp / "store")


def empty_store(tmp):
    ActivationWriter(tmp / "store", d_in=16).close()
    return enc(tmp, store=tmp / "store")


def not_a_store(tmp):
    (tmp / "store").mkdir()
    return enc(tmp, store=tmp / "store")


def store_missing(tmp):
    return enc(tmp, store=tmp / "nowhere")


def store_wrong_type(tmp):
    return enc(tmp, store=torch.zeros(4, 16))


# ----- the SAE -----------------------------------------------------------------------------------
def sae_wrong_type(tmp):
    return enc(tmp, sae=torch.zeros(4, 16))


def sae_folder_missing(tmp):
    return enc(tmp, sae=tmp / "no-sae", device="cpu")


def sae_dir_without_checkpoint(tmp):
    (tmp / "empty").mkdir()
    return enc(tmp, sae_dir=tmp / "empty")


def no_gpu(tmp):
    return enc(tmp, device="cuda")


def bad_device(tmp):
    return enc(tmp, device="tpu:0")


# ----- settings ----------------------------------------------------------------------------------
def setting(name, value):
    return lambda tmp: enc(tmp, **{name: value})


# ----- the output folder ---------------------------------------------------------------------------
def out_is_file(tmp):
    (tmp / "out").write_text("x")
    return enc(tmp)


def out_is_other_folder(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return enc(tmp)


def out_is_a_store(tmp):
    make_store(tmp / "out", 2)
    return enc(tmp)


def out_locked(tmp):
    with exclusive_lock(tmp / "out", "encode output folder"):
        return enc(tmp)


def other_sae_finished(tmp):
    finished(tmp)
    return enc(tmp, sae=make_sae(seed=5))


def other_store_finished(tmp):
    finished(tmp)
    return enc(tmp, store=make_store(tmp / "store2", 6, seed=9))


def other_sae_unfinished(tmp):
    unfinished(tmp)
    return enc(tmp, sae=make_sae(seed=5), batch_tokens=8)


def other_top_k_finished(tmp):
    finished(tmp)
    return enc(tmp, top_k=4)


def other_batch_tokens_unfinished(tmp):
    unfinished(tmp)
    return enc(tmp, batch_tokens=9)


def replaced_with_resume_false(tmp):
    finished(tmp)
    return enc(tmp, sae=make_sae(seed=5), resume=False)


def replaced_check(result, tmp):
    assert result.summary["sae"]["checksum"] == encode_module.sae_checksum(make_sae(seed=5))


def damaged_resume_state(tmp):
    out = unfinished(tmp)
    (out / "resume.safetensors").write_bytes(b"garbage")
    return enc(tmp, batch_tokens=8)


def truncated_codes_file(tmp):
    out = unfinished(tmp)
    (out / "codes.values.npy").write_bytes((out / "codes.values.npy").read_bytes()[:200])
    return enc(tmp, batch_tokens=8)


def damaged_resume_then_no_resume(tmp):
    out = unfinished(tmp)
    (out / "resume.safetensors").write_bytes(b"garbage")
    return enc(tmp, batch_tokens=8, resume=False)


# ----- the reader ----------------------------------------------------------------------------------
def read_unfinished(tmp):
    return EncodedDataset(unfinished(tmp))


def read_empty_folder(tmp):
    (tmp / "out").mkdir()
    return EncodedDataset(tmp / "out")


def read_missing(tmp):
    return EncodedDataset(tmp / "nowhere")


def read_summary_damaged(tmp):
    finished(tmp)
    (tmp / "out" / "summary.json").write_text("{")
    return EncodedDataset(tmp / "out")


def read_codes_file_missing(tmp):
    finished(tmp)
    (tmp / "out" / "codes.indices.npy").unlink()
    return EncodedDataset(tmp / "out")


def read_codes_shape_edited(tmp):
    finished(tmp)
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    summary["files"]["sources.npy"]["shape"] = [1, 2]
    (tmp / "out" / "summary.json").write_text(json.dumps(summary))
    return EncodedDataset(tmp / "out")


def image_path_store_gone(tmp):
    import shutil

    done = finished(tmp)
    shutil.rmtree(tmp / "store")
    return done.image_path(0)


def image_path_store_replaced(tmp):
    import shutil

    done = finished(tmp)
    shutil.rmtree(tmp / "store")
    make_store(tmp / "store", 6, seed=4, paths=True)
    return done.image_path(0)


def reader_call(call):
    return lambda tmp: call(finished(tmp))


CASES = [
    case("sae-other-d-in", other_d_in, DataMismatchError, "d_in=8", "d_in=16", "store"),
    case("sae-layer-metadata", layer_from_metadata, None, "blocks.7", "blocks.3", warns=UserWarning,
         check=encoded_fine),
    case("sae-layer-provenance", layer_from_provenance, None, "blocks.9", "blocks.3", "config.json",
         warns=UserWarning, check=encoded_fine),
    case("sae-backbone-metadata", backbone_from_metadata, None, "dinov2", "tiny", warns=UserWarning,
         check=encoded_fine),
    case("store-unfinished", unfinished_store, StoreIncompleteError, "unfinished", "finish the recording",
         "run encode again"),
    case("store-unfinished-object", unfinished_store_object, StoreIncompleteError, "unfinished", "--resume"),
    case("store-being-written", store_being_written, StoreIncompleteError, "is writing it now"),
    case("store-images-split", unordered_images, DataError, "image 0 at row 6 after image 1", "sorted by image"),
    case("store-images-decreasing", decreasing_images, DataError, "image 1 at row 2 after image 2"),
    case("store-empty", empty_store, DataError, "holds no tokens", "record"),
    case("store-not-a-store", not_a_store, StoreError, "not an activation store"),
    case("store-missing", store_missing, InputError, "not a folder", "activation store"),
    case("store-wrong-type", store_wrong_type, InputError, "ActivationStore or its directory"),
    case("sae-wrong-type", sae_wrong_type, InputError, "SAE or its checkpoint folder"),
    case("sae-folder-missing", sae_folder_missing, CheckpointError, "not a directory"),
    case("sae-dir-not-a-checkpoint", sae_dir_without_checkpoint, InputError, "not an SAE checkpoint folder"),
    case("device-bad", bad_device, InputError, "tpu:0", "'cpu'"),
    case("batch-tokens-zero", setting("batch_tokens", 0), ConfigError, "batch_tokens", ">= 1"),
    case("batch-tokens-float", setting("batch_tokens", 12.5), ConfigError, "batch_tokens", "12.5"),
    case("batch-tokens-bool", setting("batch_tokens", True), ConfigError, "batch_tokens"),
    case("top-k-zero", setting("top_k", 0), ConfigError, "top_k", ">= 1"),
    case("top-k-negative", setting("top_k", -3), ConfigError, "top_k"),
    case("resume-not-bool", setting("resume", "yes"), ConfigError, "resume", "True or False"),
    case("progress-not-bool", setting("progress", 1), ConfigError, "progress"),
    case("backend-not-str", setting("backend", 3), ConfigError, "backend"),
    case("backend-unknown", setting("backend", "nope"), ConfigError, "'nope'", "'auto'", "'triton'"),
    case("out-is-file", out_is_file, InputError, "is a file", "folder"),
    case("out-other-folder", out_is_other_folder, InputError, "notes.txt", "not an encode output", "new or empty"),
    case("out-is-a-store", out_is_a_store, InputError, "activation store", "another folder"),
    case("out-locked", out_locked, LockedError, "in use", "another folder"),
    case("out-other-sae-finished", other_sae_finished, DataMismatchError, "finished encoding", "checksum",
         "another out_dir", "resume=False"),
    case("out-other-store-finished", other_store_finished, DataMismatchError, "store2", "store ", "resume=False"),
    case("out-other-sae-unfinished", other_sae_unfinished, DataMismatchError, "unfinished encoding", "resume=False"),
    case("out-other-top-k", other_top_k_finished, DataMismatchError, "top_k=3 there, 4 now", "resume=False"),
    case("out-other-batch-tokens", other_batch_tokens_unfinished, DataMismatchError, "batch_tokens=8 there, 9 now"),
    case("out-replaced-resume-false", replaced_with_resume_false, None, "removed", warns=UserWarning,
         check=replaced_check),
    case("resume-state-damaged", damaged_resume_state, StoreCorruptError, "resume.safetensors", "damaged",
         "resume=False"),
    case("resume-codes-truncated", truncated_codes_file, StoreCorruptError, "codes.values.npy", "resume=False"),
    case("resume-damaged-no-resume", damaged_resume_then_no_resume, None, "removed", warns=UserWarning,
         check=lambda result, tmp: encoded_fine(result, tmp)),
    case("read-unfinished", read_unfinished, StoreIncompleteError, "did not finish", "run encode again"),
    case("read-empty-folder", read_empty_folder, InputError, "not an encode output"),
    case("read-missing", read_missing, InputError, "not a folder"),
    case("read-summary-damaged", read_summary_damaged, StoreCorruptError, "not valid JSON", "resume=False"),
    case("read-codes-missing", read_codes_file_missing, StoreCorruptError, "codes.indices.npy", "missing"),
    case("read-shape-edited", read_codes_shape_edited, StoreCorruptError, "sources.npy", "[1, 2]"),
    case("read-rows-out-of-range", reader_call(lambda e: e.codes([0, e.n_tokens])), InputError, "[0, "),
    case("read-rows-negative", reader_call(lambda e: e.sources([-1])), InputError, "must lie in"),
    case("read-rows-float", reader_call(lambda e: e.codes(np.array([0.5]))), InputError, "integers"),
    case("read-image-out-of-range", reader_call(lambda e: e.image_rows(e.n_images)), InputError, "out of range"),
    case("read-image-not-int", reader_call(lambda e: e.image_rows(1.0)), InputError, "integer"),
    case("read-unknown-rule", reader_call(lambda e: e.exemplars("mean")), InputError, "'mean'", "patch"),
    case("read-image-path-store-gone", image_path_store_gone, InputError, "summary.json", "cannot be opened"),
    case("read-image-path-store-replaced", image_path_store_replaced, DataMismatchError, "content hash",
         "not the one encoded here"),
    case("read-image-path-none-recorded", reader_call(lambda e: e.image_path(0)), InputError, "no image paths"),
]
if not torch.cuda.is_available():
    CASES.append(case("device-no-gpu", no_gpu, InputError, "no CUDA GPU", "device='cpu'"))

test_hostile_encode = hostile_table(CASES)


def test_a_second_pass_on_a_locked_folder_touches_nothing(tmp_path):
    done = finished(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.name != ".lock"}
    with exclusive_lock(tmp_path / "out", "encode output folder"), pytest.raises(LockedError):
        enc(tmp_path, resume=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.name != ".lock"} == before
    assert EncodedDataset(tmp_path / "out").summary == done.summary
