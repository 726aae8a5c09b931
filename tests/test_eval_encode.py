"""The encode pass (saeengine.eval.encode) and its reader: codes, sources and every
accumulator against a direct computation over all rows, batches cut at image boundaries,
the CSR layout of variable-width codes, reuse of a finished folder, resume after an
in-process failure, the CLI, and the layer recorded by training."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from encode_helpers import MAX_TOKENS, folder_bytes, image_sizes, make_sae, make_store

import saeengine
from saeengine.architectures import DenseCode
from saeengine.cli import main
from saeengine.errors import StoreIncompleteError
from saeengine.eval import encode as encode_module
from saeengine.eval.batch import TokenBatch, code_pairs
from saeengine.eval.encode import encode_store
from saeengine.eval.encoded import EncodedDataset
from saeengine.eval.exemplars import Exemplars
from saeengine.eval.latent_stats import LatentStats
from saeengine.eval.metrics import ReconstructionMetrics
from saeengine.store import ActivationStore
from saeengine.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # a loaded 2-core machine: threads only wait


class Spy:
    """An accumulator that records each batch's rows, images and CLS flags (and can fail)."""

    def __init__(self, fail_after: int | None = None):
        self.batches, self.fail_after = [], fail_after

    def update(self, batch: TokenBatch) -> None:
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise RuntimeError("spy: planned failure")
        self.batches.append((batch.first_row, batch.image.cpu().numpy(), batch.position.cpu().numpy(),
                             batch.is_cls.cpu().numpy()))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def with_spy(monkeypatch, spy: Spy) -> Spy:
    real = encode_module.make_accumulators
    monkeypatch.setattr(encode_module, "make_accumulators", lambda d_sae, top_k: {**real(d_sae, top_k), "spy": spy})
    return spy


def all_rows(store: ActivationStore) -> np.ndarray:
    return np.arange(store.n_tokens, dtype=np.int64)


def direct(sae, store: ActivationStore, top_k: int):
    """The accumulators fed with ALL rows as one batch, and the code of all rows."""
    rows = all_rows(store)
    x = store.get(rows).float()
    with torch.no_grad():
        code = sae.encode(x)
        x_hat = sae.decode(code).float()
    values, indices = code_pairs(code)
    image, position = (torch.from_numpy(a) for a in store.sources(rows))
    batch = TokenBatch(x, x_hat, values, indices, image, position, position == 0)
    accs = ReconstructionMetrics(), LatentStats(sae.cfg.d_sae), Exemplars(sae.cfg.d_sae, top_k)
    for acc in accs:
        acc.update(batch)
    return code, [acc.result() for acc in accs]


def greedy_batches(sizes, budget: int) -> list[list[int]]:
    """Brute force: the images of each batch, taking whole images while they fit."""
    batches, current, filled = [], [], 0
    for image, n in enumerate(sizes):
        if current and filled + n > budget:
            batches.append(current)
            current, filled = [], 0
        current.append(image)
        filled += n
    return batches + [current]


@pytest.mark.parametrize("budget", [3, 20])
def test_topk_round_trip_matches_direct_computation(tmp_path, monkeypatch, budget):
    """budget 3: most images (up to 10 tokens) exceed it and are batches of their own."""
    store = ActivationStore(make_store(tmp_path / "store", 14))
    sae = make_sae("topk")
    spy = with_spy(monkeypatch, Spy())
    encoded = encode_store(sae, store, tmp_path / "out", batch_tokens=budget, top_k=5, progress=False)
    code, (metrics, stats, exemplars) = direct(sae, store, 5)

    values, indices = encoded.codes(all_rows(store))
    np.testing.assert_allclose(values, code.values.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(indices, code.indices.numpy())
    assert values.dtype == np.float32 and indices.dtype == np.int64 and values.shape == (store.n_tokens, 4)
    for got, want in zip(encoded.sources(all_rows(store)), store.sources(all_rows(store))):
        np.testing.assert_array_equal(got, want)
    for key, value in metrics.items():
        assert encoded.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for key in ("count", "histogram", "n_tokens"):
        assert torch.equal(encoded.stats[key], stats[key]), key
    for key in ("mean_nonzero", "max", "p99", "frequency"):
        torch.testing.assert_close(encoded.stats[key], stats[key], rtol=1e-5, atol=1e-6)
    assert encoded.metrics["dead_fraction"] == pytest.approx(float((stats["count"] == 0).double().mean()))
    for rule in ("patch", "image", "cls"):
        got = encoded.exemplars(rule)
        assert torch.equal(got["images"], exemplars[rule]["images"]) and torch.equal(got["positions"],
                                                                                     exemplars[rule]["positions"])
        torch.testing.assert_close(got["scores"], exemplars[rule]["scores"], rtol=1e-6, atol=1e-6)

    # batches: whole images, in store order, as the brute-force greedy cut
    sizes = image_sizes(14, 0)
    expected = greedy_batches(sizes.tolist(), budget)
    assert [sorted(set(image.tolist())) for _, image, _, _ in spy.batches] == expected
    assert encoded.summary["counts"]["batches"] == len(expected)
    assert [row for row, *_ in spy.batches] == np.cumsum([0] + [sizes[b].sum() for b in expected[:-1]]).tolist()
    for _, image, position, is_cls in spy.batches:
        np.testing.assert_array_equal(is_cls, position == 0)  # the store's token_kinds put the CLS at 0
    counts = encoded.summary["counts"]
    assert (counts["tokens"], counts["images"], counts["image_ids"], counts["d_sae"]) == (store.n_tokens, 14, 14, 64)
    assert (encoded.n_tokens, encoded.n_images, encoded.d_sae) == (store.n_tokens, 14, 64)


def test_reader_image_rows_and_summary_files(tmp_path):
    sizes = [3, 1, 4, 2]
    store = ActivationStore(make_store(tmp_path / "store", sizes=sizes, cls=False))
    encoded = encode_store(make_sae(), store, tmp_path / "out", top_k=2, progress=False)
    starts = np.cumsum([0] + sizes)
    for image, n in enumerate(sizes):
        np.testing.assert_array_equal(encoded.image_rows(image), np.arange(starts[image], starts[image] + n))
    files = encoded.summary["files"]
    for name, entry in files.items():
        assert (tmp_path / "out" / name).is_file() and entry["holds"], name
        if name.endswith(".npy"):
            array = np.load(tmp_path / "out" / name, mmap_mode="r")
            assert list(array.shape) == entry["shape"] and str(array.dtype) == entry["dtype"]
    assert files["codes.values.npy"]["shape"] == [10, 4] and files["sources.npy"]["shape"] == [10, 2]
    assert set(files["exemplars.safetensors"]["tensors"]) == {f"{r}.{f}" for r in ("patch", "image", "cls")
                                                              for f in ("scores", "images", "positions")}
    assert encoded.summary["store"]["layer"] == "blocks.3" and encoded.summary["store"]["content_hash"] == \
        store.content_hash
    assert not (tmp_path / "out" / "resume.safetensors").exists()
    assert not encoded.exemplars("cls")["images"].ge(0).any()  # no CLS tokens: all pad
    assert np.load(tmp_path / "out" / "codes.values.npy", mmap_mode="r").flags.writeable is False


def test_reader_image_paths_come_from_the_store(tmp_path):
    store = make_store(tmp_path / "store", 4, paths=True)
    encoded = encode_store(make_sae(), store, tmp_path / "out", top_k=2, progress=False)
    assert [encoded.image_path(i) for i in range(4)] == ActivationStore(store).image_paths == \
        [f"img-{i}.png" for i in range(4)]


def test_no_token_kinds_means_no_cls(tmp_path, monkeypatch):
    store = ActivationStore(make_store(tmp_path / "store", 5, cls=False))
    spy = with_spy(monkeypatch, Spy())
    encode_store(make_sae(), store, tmp_path / "out", batch_tokens=8, top_k=2, progress=False)
    assert spy.batches and not any(is_cls.any() for *_, is_cls in spy.batches)


@pytest.mark.parametrize("architecture", ["relu", "batchtopk"])
def test_variable_width_codes_are_csr(tmp_path, architecture):
    store = ActivationStore(make_store(tmp_path / "store", 9))
    sae = make_sae(architecture)
    encoded = encode_store(sae, store, tmp_path / "out", batch_tokens=16, top_k=3, progress=False)
    assert encoded.summary["settings"]["code_layout"] == "csr"
    with torch.no_grad():
        code = sae.encode(store.get(all_rows(store)).float())
    want = code.values if isinstance(code, DenseCode) else code.to_dense(sae.cfg.d_sae)
    values, indices = encoded.codes(all_rows(store))
    got = torch.zeros_like(want).scatter_add_(1, torch.from_numpy(indices), torch.from_numpy(values))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    indptr = np.load(tmp_path / "out" / "codes.indptr.npy")
    assert indptr[0] == 0 and indptr[-1] == encoded.summary["counts"]["code_entries"] == int((want > 0).sum())
    assert values.shape[1] == int((want > 0).sum(1).max())  # padded to the widest row asked for
    few_values, _ = encoded.codes([2, 0])
    np.testing.assert_array_equal(few_values[0, :int((want[2] > 0).sum())], values[2, :int((want[2] > 0).sum())])


def test_finished_folder_is_reused_without_work(tmp_path, monkeypatch):
    store = make_store(tmp_path / "store", 6)
    sae = make_sae()
    first = encode_store(sae, store, tmp_path / "out", top_k=3, progress=False)
    before = folder_bytes(tmp_path / "out")
    monkeypatch.setattr(encode_module, "_Pass", None)  # any work would fail
    again = encode_store(make_sae(), store, tmp_path / "out", top_k=3, progress=False)  # same weights
    assert again.summary == first.summary and folder_bytes(tmp_path / "out") == before


def test_resume_false_replaces_with_a_warning(tmp_path):
    store = make_store(tmp_path / "store", 6)
    encode_store(make_sae(), store, tmp_path / "out", top_k=3, progress=False)
    with pytest.warns(UserWarning, match="removed; starting over"):
        replaced = encode_store(make_sae(seed=1), store, tmp_path / "out", top_k=2, resume=False, progress=False)
    assert replaced.summary["settings"]["top_k"] == 2
    assert replaced.exemplars("patch")["scores"].shape == (64, 2)


def test_explorer_notes_and_cache_survive_a_new_pass(tmp_path):
    """saeengine explore keeps its notes and cache inside the encode folder; a later pass
    into that folder neither refuses it as foreign nor deletes them."""
    store = make_store(tmp_path / "store", 6)
    encode_store(make_sae(), store, tmp_path / "out", top_k=3, progress=False)
    (tmp_path / "out" / "explore-notes.json").write_text('{"3": "loops"}')
    (tmp_path / "out" / "explore-cache").mkdir()
    (tmp_path / "out" / "explore-cache" / "thumb.png").write_bytes(b"png")
    with pytest.warns(UserWarning, match="removed; starting over"):
        encode_store(make_sae(seed=1), store, tmp_path / "out", top_k=2, resume=False, progress=False)
    assert (tmp_path / "out" / "explore-notes.json").read_text() == '{"3": "loops"}'
    assert (tmp_path / "out" / "explore-cache" / "thumb.png").read_bytes() == b"png"


def fail_in_commit(patched, at_call: int, after_sync: bool) -> None:
    """The ``at_call``-th commit fails: before anything (the batch's rows are written past
    the last commit), or once the code files are synced (a CSR header counts entries that
    the saved state does not)."""
    real, calls = encode_module._Pass._commit, []

    def commit(self):
        calls.append(1)
        if len(calls) == at_call:
            if after_sync:
                self.files.sync()
            raise RuntimeError("spy: planned failure in a commit")
        real(self)

    patched.setattr(encode_module._Pass, "_commit", commit)


@pytest.mark.parametrize("architecture,fail", [("topk", "update-3"), ("relu", "update-2"), ("topk", "update-0"),
                                               ("topk", "commit-3"), ("relu", "commit-3"), ("relu", "synced-4")])
def test_failed_pass_resumes_to_identical_files(tmp_path, monkeypatch, architecture, fail):
    store = make_store(tmp_path / "store", 16)
    sae = make_sae(architecture)
    encode_store(sae, store, tmp_path / "clean", batch_tokens=12, top_k=4, progress=False)
    monkeypatch.setattr(encode_module, "COMMIT_EVERY_S", 0.0)
    where, at = fail.split("-")
    with monkeypatch.context() as patched:
        if where == "update":
            with_spy(patched, Spy(fail_after=int(at)))
        else:
            fail_in_commit(patched, int(at), after_sync=where == "synced")
        with pytest.raises(RuntimeError, match="planned failure"):
            encode_store(sae, store, tmp_path / "out", batch_tokens=12, top_k=4, progress=False)
    with pytest.raises(StoreIncompleteError, match="run encode again"):
        EncodedDataset(tmp_path / "out")
    resumed = encode_store(sae, store, tmp_path / "out", batch_tokens=12, top_k=4, progress=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")
    assert resumed.summary["counts"]["tokens"] == ActivationStore(store).n_tokens


def test_cli_encode_end_to_end(tmp_path, capsys):
    store = make_store(tmp_path / "store", 8)
    make_sae().save(tmp_path / "sae")
    argv = ["encode", "--sae", str(tmp_path / "sae"), "--data", str(store), "--out", str(tmp_path / "out"),
            "--batch-tokens", "16", "--top-k", "3", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert f"encoded {summary['counts']['tokens']} tokens of 8 images" in out
    assert f"FVU {summary['metrics']['fvu']:.4f}" in out and "summary.json" in out and str(tmp_path / "out") in out
    assert summary["sae"]["dir"] == str((tmp_path / "sae").resolve())
    # same SAE loaded from disk as in memory: the same checksum, so the folder is reused
    assert encode_store(make_sae(), store, tmp_path / "out", batch_tokens=16, top_k=3, progress=False).summary == \
        summary
    assert main(argv) == 0
    with pytest.raises(SystemExit) as usage:
        main(argv[:7] + ["--top-k", "0", "--no-progress"])
    assert usage.value.code == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err


def test_cli_help_lists_every_output_file(capsys):
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    text = capsys.readouterr().out
    for name in ("summary.json", "codes.values.npy", "codes.indices.npy", "codes.indptr.npy", "sources.npy",
                 "latent_stats.safetensors", "exemplars.safetensors"):
        assert name in text, name


def test_cli_error_is_one_line(tmp_path, capsys):
    store = make_store(tmp_path / "store", 3)
    make_sae(d_in=8).save(tmp_path / "sae")
    code = main(["encode", "--sae", str(tmp_path / "sae"), "--data", str(store), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("saeengine encode: error: ") and "d_in=8" in err and "d_in=16" in err
    assert len(err.splitlines()) == 1


def test_interrupt_note_says_what_was_kept(tmp_path, monkeypatch):
    from argparse import Namespace

    from saeengine.cli_encode import interrupted_encode

    store = make_store(tmp_path / "store", 10)
    assert "before the first commit" in interrupted_encode(Namespace(out=tmp_path / "none", no_resume=False))
    monkeypatch.setattr(encode_module, "COMMIT_EVERY_S", 0.0)
    with monkeypatch.context() as patched:
        with_spy(patched, Spy(fail_after=2))
        with pytest.raises(RuntimeError):
            encode_store(make_sae(), store, tmp_path / "out", batch_tokens=10, top_k=2, progress=False)
    note = interrupted_encode(Namespace(out=tmp_path / "out", no_resume=False))
    n = ActivationStore(store).n_tokens
    assert f"of {n} tokens" in note and "the same command continues" in note


def test_training_records_the_store_layer_and_encode_warns_on_another(tmp_path):
    trained_on = ActivationStore(make_store(tmp_path / "train", 40, layer="blocks.1"))
    cfg = TrainConfig(d_sae=32, k=4, total_tokens=128, batch_size=64, out_dir=str(tmp_path / "runs"), name="s",
                      progress=False, device="cpu", log_every=1, warmup_steps=1)
    saeengine.train(trained_on, cfg)
    provenance = json.loads((tmp_path / "runs" / "s" / "config.json").read_text())["provenance"]
    assert provenance["store"]["layer"] == "blocks.1" and provenance["store"]["backbone"] == "tiny"
    other = make_store(tmp_path / "other", 5, layer="blocks.3")
    with pytest.warns(UserWarning, match=r"layer 'blocks.1'.*layer 'blocks.3'"):
        encode_store(tmp_path / "runs" / "s", other, tmp_path / "out", top_k=2, progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the store it was trained on: no warning
        encode_store(tmp_path / "runs" / "s", trained_on, tmp_path / "out2", top_k=2, progress=False, device="cpu")


def test_one_image_larger_than_the_budget_is_one_batch(tmp_path, monkeypatch):
    store = make_store(tmp_path / "store", sizes=[2, MAX_TOKENS, 1, MAX_TOKENS, MAX_TOKENS])
    spy = with_spy(monkeypatch, Spy())
    encode_store(make_sae(), store, tmp_path / "out", batch_tokens=4, top_k=2, progress=False)
    assert [sorted(set(image.tolist())) for _, image, _, _ in spy.batches] == [[0], [1], [2], [3], [4]]


def test_resuming_with_another_thread_count_warns_naming_both(tmp_path, monkeypatch):
    store = make_store(tmp_path / "store", 12)
    sae = make_sae()
    encode_store(sae, store, tmp_path / "clean", batch_tokens=12, top_k=4, progress=False)
    monkeypatch.setattr(encode_module, "COMMIT_EVERY_S", 0.0)
    with monkeypatch.context() as patched:
        with_spy(patched, Spy(fail_after=2))
        with pytest.raises(RuntimeError, match="planned failure"):
            encode_store(sae, store, tmp_path / "out", batch_tokens=12, top_k=4, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(UserWarning, match=rf"torch_threads {threads} -> {threads + 1}.*last bits may differ"):
            encode_store(sae, store, tmp_path / "out", batch_tokens=12, top_k=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    # the same store and SAE: the result is still the uninterrupted one here (CPU sums agree)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")
