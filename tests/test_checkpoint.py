"""Checkpoint round trip and the errors for missing, truncated or mismatched files."""

import errno
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from saeengine import SAE, CheckpointError, SAEConfig
from saeengine.errors import DiskFullError, NonFiniteError

from conftest import assert_same_saved_sae


def trained_like_sae(arch="topk", normalization="mean_norm"):
    sae = SAE(SAEConfig(d_in=24, d_sae=40, k=5, architecture=arch, normalization=normalization,
                        metadata={"backbone": "tiny", "layer": 3}), seed=3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p))
    sae.fit_normalization(torch.randn(100, 24) * 2 + 1)
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_save_load_is_bit_identical(tmp_path, arch):
    sae = trained_like_sae(arch)
    sae.save(tmp_path / "ckpt")
    loaded = SAE.load(tmp_path / "ckpt")
    assert_same_saved_sae(sae, loaded)
    x = torch.randn(9, 24)
    sae.eval(), loaded.eval()
    assert torch.equal(sae(x).recon, loaded(x).recon)
    assert all(p.requires_grad for p in loaded.parameters())
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["normalization"]["present"] is True and meta["library_version"]


def test_missing_files_are_named(tmp_path):
    trained_like_sae().save(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="sae.safetensors: missing"):
        SAE.load(tmp_path / "a")
    trained_like_sae().save(tmp_path / "b")
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        SAE.load(tmp_path / "b")
    with pytest.raises(CheckpointError, match="not a directory"):
        SAE.load(tmp_path / "nowhere")


def test_truncated_files_are_detected(tmp_path):
    trained_like_sae().save(tmp_path / "c")
    weights = tmp_path / "c" / "sae.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])
    # The size recorded at save names the cause (a truncated file was "unreadable" before).
    with pytest.raises(CheckpointError, match=rf"sae.safetensors: truncated or replaced: it has {size - 100} bytes "
                                              rf"but .*config.json records {size}"):
        SAE.load(tmp_path / "c")
    trained_like_sae().save(tmp_path / "d")
    cfg = tmp_path / "d" / "config.json"
    cfg.write_text(cfg.read_text()[:50])
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        SAE.load(tmp_path / "d")


def test_mismatched_files_are_detected(tmp_path):
    trained_like_sae().save(tmp_path / "e")
    trained_like_sae().save(tmp_path / "f")
    # Weights of one save next to the config of another.
    (tmp_path / "e" / "sae.safetensors").write_bytes((tmp_path / "f" / "sae.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="different saves"):
        SAE.load(tmp_path / "e")
    # A config whose shapes disagree with the tensors names the tensor and the field.
    trained_like_sae().save(tmp_path / "g")
    path = tmp_path / "g" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["d_sae"] = 41
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'W_dec' has shape \(40, 24\).*d_sae=41"):
        SAE.load(tmp_path / "g")
    del meta["checkpoint_id"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="field 'checkpoint_id' is missing"):
        SAE.load(tmp_path / "g")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    sae = trained_like_sae()
    sae.save(tmp_path / "h")
    before = (tmp_path / "h" / "sae.safetensors").read_bytes()
    import saeengine.checkpoint as ck

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        sae.save(tmp_path / "h")
    assert (tmp_path / "h" / "sae.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "h").iterdir() if p.name.startswith(".")] == []  # no temp left
    SAE.load(tmp_path / "h")  # still loads


def test_config_json_records_the_weights_checksum(tmp_path):
    trained_like_sae().save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    raw = (tmp_path / "s" / "sae.safetensors").read_bytes()
    assert meta["format_version"] == 2
    assert meta["weights"] == {"file": "sae.safetensors", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_failed_config_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """config.json fails after the new weights are written: neither file changes."""
    sae = trained_like_sae()
    sae.save(tmp_path / "k")
    before = _files(tmp_path / "k")

    def broken(self, *a, **k):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="I/O error"):
        trained_like_sae(normalization="none").save(tmp_path / "k")
    monkeypatch.undo()
    assert _files(tmp_path / "k") == before  # no temporary file left either
    assert_same_saved_sae(sae, SAE.load(tmp_path / "k"))


def test_poisoned_save_keeps_previous_checkpoint(tmp_path):
    sae = trained_like_sae()
    sae.save(tmp_path / "p")
    before = _files(tmp_path / "p")
    with torch.no_grad():
        sae.W_enc[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to save a poisoned SAE .*'W_enc' \(1 of 960 values\)"):
        sae.save(tmp_path / "p")
    assert _files(tmp_path / "p") == before
    with pytest.raises(NonFiniteError):
        sae.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def _save_with_full_disk(directory):
    """Save a small SAE, then one too big for the disk: DiskFullError, the first intact."""
    small = trained_like_sae()
    small.save(directory / "ckpt")
    before = _files(directory / "ckpt")
    big = SAE(SAEConfig(d_in=64, d_sae=8192, k=4), seed=0)  # 4 MiB of weights
    with pytest.raises(DiskFullError, match="the disk is full"):
        big.save(directory / "ckpt")
    assert _files(directory / "ckpt") == before
    assert_same_saved_sae(small, SAE.load(directory / "ckpt"))


def test_disk_full_keeps_previous_checkpoint_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_disk_full_keeps_previous_checkpoint covers it")
    try:
        _save_with_full_disk(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """The CPU counterpart of the tmpfs test (where mounting is not allowed)."""
    import saeengine.checkpoint as ck

    real_save_file = ck.save_file

    def full(tensors, path, metadata=None):
        if tensors["W_dec"].shape[0] > 100:  # the big SAE only; safetensors' own words for ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full)
    _save_with_full_disk(tmp_path)
