"""Checkpoint round trip and the errors for missing, truncated or mismatched files."""

import json

import pytest
import torch

from saeengine import SAE, CheckpointError, SAEConfig

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
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sae.safetensors: unreadable"):
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
