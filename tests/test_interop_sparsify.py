"""EleutherAI sparsify SparseCoders in saeengine: every fixture (made by sparsify itself:
tests/fixtures/make_sparsify_fixtures.py) loads and reproduces sparsify's recorded
encode/decode; hookpoints of a run folder are chosen by name (a missing one lists those
present); W_skip is refused; the export round-trips, and sparsify itself reads it when
importable."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import _fixture_common as fc  # noqa: E402

from saeengine import SAE, SAEConfig  # noqa: E402
from saeengine.errors import CheckpointError  # noqa: E402
from saeengine.interop import detect_formats  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = fc.FIXTURES / "sparsify"
CASES = [c for c in fc.cases("sparsify") if "refused" not in fc.load_reference(c)[3]]


def _load(case: Path, **kw):
    meta = fc.load_reference(case)[3]
    return SAE.from_pretrained(case / fc.SAE_DIR, **{**meta["load"], **kw})


def test_fixture_cases_present():
    assert sorted(c.name for c in fc.cases("sparsify")) == ["run_folder", "skip", "topk", "transcoder"]


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_fixture_reproduces_sparsify(case, recwarn):
    assert detect_formats(case / fc.SAE_DIR) == ["sparsify"]
    sae = _load(case)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
    fc.check_against_reference(sae, case)
    transcoder = case.name == "transcoder"
    assert sae.cfg.metadata["interop"]["transcoder"] is transcoder
    assert any("transcoder" in str(w.message) for w in recwarn) is transcoder


def test_run_folder_hookpoints(tmp_path):
    run = ROOT / "run_folder" / fc.SAE_DIR
    with pytest.raises(CheckpointError, match=r"2 hookpoints \['layers.0', 'layers.1'\]; pass one"):
        SAE.from_pretrained(run)
    with pytest.raises(CheckpointError, match=r"no hookpoint 'layers.7' here; the hookpoints present are "
                                              r"\['layers.0', 'layers.1'\]"):
        SAE.from_pretrained(run, hookpoint="layers.7")
    a = SAE.from_pretrained(run, hookpoint="layers.0")
    b = SAE.from_pretrained(run / "layers.1")  # the hookpoint's own folder
    assert not torch.equal(a.W_enc, b.W_enc)
    fc.check_against_reference(b, ROOT / "run_folder")
    single = tmp_path / "single"
    shutil.copytree(run, single, ignore=shutil.ignore_patterns("layers.0"))
    fc.check_against_reference(SAE.from_pretrained(single), ROOT / "run_folder")  # the one hookpoint needs no name


def test_skip_connection_is_refused():
    with pytest.raises(CheckpointError, match=r"sae\.safetensors: tensor 'W_skip'.*cannot express"):
        SAE.from_pretrained(ROOT / "skip" / fc.SAE_DIR)


def _copy(tmp_path) -> Path:
    folder = tmp_path / "topk"
    shutil.copytree(ROOT / "topk" / fc.SAE_DIR, folder)
    return folder


def _edit(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_bad_configs(tmp_path):
    folder = _copy(tmp_path)
    _edit(folder, d_in=20)
    with pytest.raises(CheckpointError, match=r"tensor 'encoder.weight' has shape \[48, 16\], but the config implies "
                                              r"\[48, 20\]"):
        SAE.from_pretrained(folder)
    _edit(folder, d_in=16, num_latents=64)
    with pytest.raises(CheckpointError, match=r"imply 64 latents but sae\.safetensors holds 48"):
        SAE.from_pretrained(folder)
    _edit(folder, num_latents=48, activation="groupmax")
    with pytest.raises(CheckpointError, match=r"field 'activation' is 'groupmax'"):
        SAE.from_pretrained(folder)
    _edit(folder, activation="topk", k="4")
    with pytest.raises(CheckpointError, match=r"field 'k' is '4'; expected int"):
        SAE.from_pretrained(folder)


def test_truncated_weights(tmp_path):
    folder = _copy(tmp_path)
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match=r"sae\.safetensors: truncated"):
        SAE.from_pretrained(folder)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_export_round_trip(case, tmp_path, recwarn):
    sae = _load(case)
    sae.save(tmp_path / "out", format="sparsify")
    assert detect_formats(tmp_path / "out") == ["sparsify"]
    fc.check_against_reference(SAE.from_pretrained(tmp_path / "out"), case)


def test_export_refuses_non_topk(tmp_path):
    sae = SAE(SAEConfig(d_in=16, d_sae=48, architecture="relu"), seed=0)
    with pytest.raises(CheckpointError, match="sparsify's SparseCoder is TopK only; export it to 'saelens'"):
        sae.save(tmp_path / "out", format="sparsify")


def test_sparsify_itself_loads_the_export(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    # conftest's canary torch.empty returns views of larger buffers, which sparsify's safetensors
    # load_model refuses as "shared tensors": give the peer the real one
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    sparse_coder = pytest.importorskip("sparsify.sparse_coder", reason="sparsify is not installed here (pip install "
                                       "saeengine[peers]); tests/fixtures/make_sparsify_fixtures.py --check-export "
                                       "runs this check in a throwaway venv, and test_export_round_trip always runs")
    case = ROOT / "topk"
    _load(case).save(tmp_path / "out", format="sparsify")
    peer = sparse_coder.SparseCoder.load_from_disk(tmp_path / "out")
    x, acts, recon, _ = fc.load_reference(case)
    with torch.no_grad():
        out = peer.encode(x)
        dense = torch.zeros_like(acts).scatter(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(dense, acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(peer.decode(out.top_acts, out.top_indices), recon, atol=1e-5, rtol=1e-5)


def test_hub_download_of_one_hookpoint_only(tmp_path, monkeypatch):
    """A sparsify repo holds one folder per hookpoint: a download asks for that one only."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, allow_patterns))
        return str(ROOT / "run_folder" / fc.SAE_DIR)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(CheckpointError, match="allow_download=True"):
        SAE.from_pretrained("EleutherAI/some-sae", hookpoint="layers.1")
    assert calls == []
    sae = SAE.from_pretrained("EleutherAI/some-sae", hookpoint="layers.1", allow_download=True)
    assert calls == [("EleutherAI/some-sae", ["layers.1/*"])]
    fc.check_against_reference(sae, ROOT / "run_folder")
