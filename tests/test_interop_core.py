"""saeengine.interop's shared parts: the safe readers (truncated safetensors, shapes checked
from the header, pickles naming custom classes refused without running them), build_sae's
exact copy, format detection (none, one, ambiguous), Hugging Face ids resolved from a fake
local cache only (download only when allowed), and the native format through
from_pretrained / save(format=)."""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file

from saeengine import SAE, SAEConfig
from saeengine.errors import CheckpointError
from saeengine.interop import _common, detect_formats, from_pretrained, hub
from pickle_payload import Payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(F=24, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(F, d, generator=g), torch.randn(F, generator=g), torch.randn(F, d, generator=g) * 3,
            torch.randn(d, generator=g))


# ----- safe readers ------------------------------------------------------------------------------
def test_read_safetensors_checks_names_and_shapes_from_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2)}, str(path))
    got = _common.read_safetensors(path, {"a": (3, None), "b": (2,)})
    assert torch.equal(got["a"], torch.ones(3, 4))
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor 'a' has shape \[3, 4\].*\[3, 5\]"):
        _common.read_safetensors(path, {"a": (3, 5)})
    with pytest.raises(CheckpointError, match=r"tensors \['c'\] are missing"):
        _common.read_safetensors(path, {"c": (1,)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['b'\]"):
        _common.read_safetensors(path, {"a": (3, 4)}, allow_extra=False)


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 4)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"w\.safetensors: truncated"):
        _common.read_safetensors(path)


def test_safetensors_header_claiming_a_huge_tensor_is_refused_before_allocation(tmp_path):
    # a header whose offsets point far past the end: the reader must not trust it
    header = json.dumps({"a": {"dtype": "F32", "shape": [2**20, 2**10], "data_offsets": [0, 2**32]}}).encode()
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"evil\.safetensors: truncated: tensor 'a' ends at byte"):
        _common.read_safetensors(path)


def test_pickle_with_a_custom_class_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"W": torch.ones(2), "obj": Payload(marker)}, str(path))
    with pytest.raises(CheckpointError, match=r"model\.pt: refused: the pickle names classes outside"):
        _common.safe_torch_load(path)
    assert not marker.exists()


def test_safe_torch_load_flattens_state_dicts_and_reads_after_an_offset(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": {"W": torch.arange(3.0)}, "step": 7}, str(path))
    assert list(_common.safe_torch_load(path)) == ["state_dict.W"]
    assert _common.safe_torch_object(path)["step"] == 7
    prefixed = tmp_path / "with-header.pt"
    prefixed.write_bytes(b'{"d": 3}\n' + path.read_bytes())
    assert torch.equal(_common.safe_torch_load(prefixed, offset=9)["state_dict.W"], torch.arange(3.0))
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot be read as a torch file"):
        _common.safe_torch_load(tmp_path / "cut.pt")
    torch.save(torch.ones(2), str(tmp_path / "t.pt"))
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        _common.safe_torch_load(tmp_path / "t.pt")


def test_read_json_errors_name_the_file(tmp_path):
    (tmp_path / "cfg.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"cfg\.json: not valid JSON"):
        _common.read_json(tmp_path / "cfg.json")
    with pytest.raises(CheckpointError, match=r"nothing\.json: missing"):
        _common.read_json(tmp_path / "nothing.json")
    with pytest.raises(CheckpointError, match=r"f\.json: field 'k' is '3'; expected int"):
        _common.field(tmp_path / "f.json", {"k": "3"}, "k", int)


# ----- build_sae ---------------------------------------------------------------------------------
def test_build_sae_copies_every_weight_exactly_and_keeps_non_unit_rows():
    W_enc, b_enc, W_dec, b_dec = _weights()
    sae = _common.build_sae("topk", W_enc, b_enc, W_dec, b_dec, k=5, provenance={"format": "test"})
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        assert torch.equal(getattr(sae, name), t), name
    assert sae.cfg.k == 5 and sae.cfg.metadata["interop"]["decoder_row_norms"] == "not unit"
    # oracle: the TopK SAE formula written out
    x = torch.randn(10, 8)
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    top = pre.topk(5, dim=1)
    dense = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    code = sae.encode(x)
    torch.testing.assert_close(code.to_dense(24), dense)
    torch.testing.assert_close(sae.decode(code), dense @ W_dec + b_dec, atol=1e-5, rtol=1e-5)


def test_build_sae_jumprelu_threshold_and_normalization():
    W_enc, b_enc, W_dec, b_dec = _weights()
    threshold = torch.rand(24, generator=torch.Generator().manual_seed(1)) + 0.05
    sae = _common.build_sae("jumprelu", W_enc, b_enc, W_dec, b_dec, threshold=threshold, norm_scale=0.25)
    assert ((sae.log_threshold.exp() - threshold).abs() <= 3e-7 * threshold).all()
    x = torch.randn(10, 8)
    pre = (x / 0.25 - b_dec) @ W_enc.T + b_enc
    acts = torch.where(pre > threshold, pre, 0)
    code = sae.encode(x)
    torch.testing.assert_close(code.values, acts)
    torch.testing.assert_close(sae.decode(code), (acts @ W_dec + b_dec) * 0.25, atol=1e-5, rtol=1e-5)
    # thresholds <= 0: the peers' relu(pre) * (pre > t) is a ReLU latent there
    low = torch.cat([threshold[:-2], torch.tensor([0.0, -0.5])])
    sae = _common.build_sae("jumprelu", W_enc, b_enc, W_dec, b_dec, threshold=low)
    pre = (x - b_dec) @ W_enc.T + b_enc
    torch.testing.assert_close(sae.encode(x).values, torch.relu(pre) * (pre > low))
    with pytest.raises(CheckpointError, match=r"src\.st: field 'threshold' holds NaN"):
        _common.build_sae("jumprelu", W_enc, b_enc, W_dec, b_dec, threshold=torch.full((24,), float("nan")),
                          source="src.st")


def test_build_sae_refuses_bad_shapes_arch_and_nonfinite():
    W_enc, b_enc, W_dec, b_dec = _weights()
    with pytest.raises(CheckpointError, match=r"f\.st: tensor 'W_dec' has shape \[24, 7\]"):
        _common.build_sae("relu", W_enc, b_enc, W_dec[:, :7], b_dec, source="f.st")
    with pytest.raises(CheckpointError, match="cannot be expressed as a saeengine SAE.*architecture='gated'"):
        _common.build_sae("gated", W_enc, b_enc, W_dec, b_dec, source="f.st")
    with pytest.raises(CheckpointError, match=r"tensors \['W_enc'\] hold NaN"):
        _common.build_sae("relu", W_enc.clone().fill_(float("nan")), b_enc, W_dec, b_dec, source="f.st")
    with pytest.raises(CheckpointError, match="needs its k"):
        _common.build_sae("topk", W_enc, b_enc, W_dec, b_dec, source="f.st")


# ----- detection, native format, from_pretrained ----------------------------------------------------
def _native(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=24, k=4), seed=3)
    sae.save(tmp_path / "native")
    return sae, tmp_path / "native"


def test_native_checkpoint_through_from_pretrained(tmp_path):
    sae, folder = _native(tmp_path)
    assert detect_formats(folder) == ["saeengine"]
    loaded = SAE.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="drop hookpoint"):
        SAE.from_pretrained(folder, hookpoint="layers.0")


def test_detection_none_and_ambiguous_and_unknown_format(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no known SAE format found \(it holds \['notes.txt'\]\)"):
        from_pretrained(tmp_path / "empty")
    both = tmp_path / "both"
    both.mkdir()
    # a SAELens folder and a sparsify hookpoint folder in one place
    (both / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 24, "architecture": "standard", "k": 4}))
    save_file({"W_enc": torch.zeros(8, 24)}, str(both / "sae_weights.safetensors"))
    save_file({"encoder.weight": torch.zeros(24, 8)}, str(both / "sae.safetensors"))
    with pytest.raises(CheckpointError, match=r"ambiguous.*\['saelens', 'sparsify'\].*format='saelens'"):
        from_pretrained(both)
    with pytest.raises(CheckpointError, match="format='nope' is unknown"):
        from_pretrained(both, format="nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "missing")


def test_save_format_unknown_and_native(tmp_path):
    sae, _ = _native(tmp_path)
    with pytest.raises(CheckpointError, match="format='nope' is unknown"):
        sae.save(tmp_path / "x", format="nope")
    sae.save(tmp_path / "again", format="saeengine")
    assert detect_formats(tmp_path / "again") == ["saeengine"]


# ----- hub ids: the local cache only ---------------------------------------------------------------
def _fake_cache(tmp_path, monkeypatch, folder, *, sub=""):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--repo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    target = repo / "snapshots" / commit / sub
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(folder, target) if sys.platform != "win32" else None
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, commit


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch):
    sae, folder = _native(tmp_path)
    cache, commit = _fake_cache(tmp_path, monkeypatch, folder, sub="layer_3/width_24")
    for repo_id in ("org/repo/layer_3/width_24", f"org/repo/layer_3/width_24@{commit}"):
        loaded = SAE.from_pretrained(repo_id)
        assert torch.equal(loaded.W_enc, sae.W_enc), repo_id
    assert hub.resolve("org/repo") == cache / "models--org--repo" / "snapshots" / commit
    with pytest.raises(CheckpointError, match="has no 'layer_9'"):
        SAE.from_pretrained("org/repo/layer_9")


def test_hub_id_not_in_the_cache_names_the_path_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded without allow_download=True")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError) as err:
        SAE.from_pretrained("someone/some-sae")
    text = str(err.value)
    assert str(tmp_path / "empty-cache" / "models--someone--some-sae" / "snapshots") in text
    assert "allow_download=True" in text and "local folder" in text


def test_hub_download_only_when_allowed(tmp_path, monkeypatch):
    sae, folder = _native(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, revision, allow_patterns, cache_dir))
        return str(folder.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = SAE.from_pretrained("org/repo/native", allow_download=True)
    assert torch.equal(loaded.W_dec, sae.W_dec)
    assert calls == [("org/repo", None, ["native/*"], str(tmp_path / "cache"))]


def test_hub_cache_location_follows_huggingface_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    assert hub.parse_repo_id("./org/repo") is None and hub.parse_repo_id("org/repo@v1") == ("org/repo", "", "v1")
