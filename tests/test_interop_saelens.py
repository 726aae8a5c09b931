"""SAELens SAEs in saeengine: every fixture (made by SAELens itself: tests/fixtures/
make_saelens_fixtures.py) loads and reproduces SAELens's recorded encode/decode (the same
active latents, values and reconstructions within fp32 tolerance); the export round-trips
(saeengine -> SAELens layout -> saeengine, same outputs), and SAELens itself reads the
export when it is importable; bad folders raise CheckpointError naming file and field;
``saeengine encode --sae <SAELens folder>`` works."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import _fixture_common as fc  # noqa: E402
from encode_helpers import make_store  # noqa: E402

from saeengine import SAE, SAEConfig  # noqa: E402
from saeengine.errors import CheckpointError  # noqa: E402
from saeengine.interop import detect_formats  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = fc.cases("saelens")
EXPECTED = {  # SAELens case -> the saeengine architecture it must become
    "standard": "relu", "standard_no_bdec_input": "relu", "standard_scaled": "relu", "topk": "topk",
    "topk_rescaled": "topk", "topk_training": "topk", "jumprelu": "jumprelu", "jumprelu_training": "jumprelu",
    "gated": "jumprelu", "batchtopk_training": "batchtopk", "batchtopk_inference": "jumprelu",
    "matryoshka_training": "matryoshka",
}


def test_every_architecture_has_a_fixture():
    assert sorted(c.name for c in CASES) == sorted(EXPECTED)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_fixture_reproduces_saelens(case):
    assert detect_formats(case / fc.SAE_DIR) == ["saelens"]
    sae = SAE.from_pretrained(case / fc.SAE_DIR)
    assert sae.cfg.architecture == EXPECTED[case.name]
    assert sae.cfg.metadata["interop"]["format"] == "saelens"
    fc.check_against_reference(sae, case)
    _, acts, _, _ = fc.load_reference(case)
    assert float((acts != 0).float().mean()) < 0.9  # a real sparse code, not all latents on


def test_fixture_check_can_fail(tmp_path):
    """The comparison is not vacuous: a one-latent change in the converted SAE is caught."""
    case = fc.FIXTURES / "saelens" / "topk"
    sae = SAE.from_pretrained(case / fc.SAE_DIR)
    with torch.no_grad():
        sae.W_dec[3] *= 1.01
    x, acts, _, _ = fc.load_reference(case)
    if not bool((acts[:, 3] != 0).any()):
        pytest.fail("latent 3 never fires in the fixture: pick another")
    with pytest.raises(AssertionError, match="reconstructions"):
        fc.check_against_reference(sae, case)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_export_round_trip(case, tmp_path):
    sae = SAE.from_pretrained(case / fc.SAE_DIR)
    sae.save(tmp_path / "out", format="saelens")
    assert detect_formats(tmp_path / "out") == ["saelens"]
    again = SAE.from_pretrained(tmp_path / "out")
    fc.check_against_reference(again, case)


@pytest.mark.parametrize("case", ["gated", "matryoshka_training", "standard_scaled"])
def test_converted_sae_saves_as_a_saeengine_checkpoint(case, tmp_path):
    sae = SAE.from_pretrained(fc.FIXTURES / "saelens" / case / fc.SAE_DIR)
    sae.save(tmp_path / "native")
    assert detect_formats(tmp_path / "native") == ["saeengine"]
    again = SAE.from_pretrained(tmp_path / "native")
    assert again.cfg.metadata["interop"]["architecture"] == EXPECTED_PEER_ARCH[case]
    assert not again.training
    fc.check_against_reference(again, fc.FIXTURES / "saelens" / case)


EXPECTED_PEER_ARCH = {"gated": "gated", "matryoshka_training": "matryoshka_batchtopk", "standard_scaled": "standard"}


def test_export_folds_mean_norm_normalization(tmp_path):
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k=4, normalization="mean_norm"), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.b_enc.copy_(torch.randn(48, generator=g) * 0.2)
    sae.fit_normalization(torch.randn(200, 16, generator=g) * 3 + 2)
    x = torch.randn(20, 16, generator=g) * 3 + 2
    acts, recon = fc.saeengine_outputs(sae, x)
    sae.save(tmp_path / "out", format="saelens")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["architecture"] == "topk" and cfg["k"] == 4
    again = SAE.from_pretrained(tmp_path / "out")
    assert again.cfg.normalization == "none"
    a2, r2 = fc.saeengine_outputs(again, x)
    assert torch.equal(a2 != 0, acts != 0)
    torch.testing.assert_close(a2, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r2, recon, atol=1e-4, rtol=1e-5)


def test_saelens_itself_loads_the_export(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed here (pip install "
                                   "saeengine[peers]); tests/fixtures/make_saelens_fixtures.py --check-export runs "
                                   "this check in a throwaway venv, and test_export_round_trip always runs")
    for case in ("topk", "gated", "batchtopk_training"):
        sae = SAE.from_pretrained(fc.FIXTURES / "saelens" / case / fc.SAE_DIR)
        sae.save(tmp_path / case, format="saelens")
        peer = sae_lens.SAE.load_from_disk(tmp_path / case)
        x, acts, recon, _ = fc.load_reference(fc.FIXTURES / "saelens" / case)
        with torch.no_grad():
            a = peer.encode(x)
            torch.testing.assert_close(a, acts, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(peer.decode(a), recon, atol=1e-5, rtol=1e-5)


# ----- refused folders ---------------------------------------------------------------------------
def _copy(tmp_path, case="standard") -> Path:
    folder = tmp_path / case
    shutil.copytree(fc.FIXTURES / "saelens" / case / fc.SAE_DIR, folder)
    return folder


def _edit(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_config_shapes_disagreeing_with_weights(tmp_path):
    folder = _copy(tmp_path)
    _edit(folder, d_sae=50)
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors: tensor 'W_enc' has shape \[16, 48\], but "
                                              r"the config implies \[16, 50\]"):
        SAE.from_pretrained(folder)


def test_truncated_weights(tmp_path):
    folder = _copy(tmp_path)
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors: truncated"):
        SAE.from_pretrained(folder)


@pytest.mark.parametrize("arch, why", [("transcoder", "transcoder"), ("skip_transcoder", "W_skip"),
                                       ("abstopk", "negative"), ("my_new_sae", "does not know it")])
def test_unknown_or_inexpressible_architecture(tmp_path, arch, why):
    folder = _copy(tmp_path)
    _edit(folder, architecture=arch)
    with pytest.raises(CheckpointError, match=rf"cfg\.json: field 'architecture' is '{arch}'.*{why}.*'gated'"):
        SAE.from_pretrained(folder)


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale", "covariance_whitening"])
def test_per_token_normalizations_are_refused(tmp_path, mode):
    folder = _copy(tmp_path)
    _edit(folder, normalize_activations=mode)
    with pytest.raises(CheckpointError, match=rf"field 'normalize_activations' is '{mode}'"):
        SAE.from_pretrained(folder)


def test_scaling_factor_must_be_in_the_folder(tmp_path):
    folder = _copy(tmp_path, "standard_scaled")
    (folder / "activation_scaler.json").unlink()
    with pytest.raises(CheckpointError, match=r"'expected_average_only_in' but the folder has no scaling factor"):
        SAE.from_pretrained(folder)


def test_fractional_batchtopk_k_and_hookpoint_are_refused(tmp_path):
    folder = _copy(tmp_path, "batchtopk_training")
    _edit(folder, k=3.5)
    with pytest.raises(CheckpointError, match=r"field 'k' is 3\.5.*save_inference_model"):
        SAE.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="holds one SAE; drop hookpoint"):
        SAE.from_pretrained(fc.FIXTURES / "saelens" / "topk" / fc.SAE_DIR, hookpoint="blocks.3")


def test_export_refuses_an_untrained_batchtopk(tmp_path):
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k=4, architecture="batchtopk"), seed=0)
    with pytest.raises(CheckpointError, match="inference threshold is not set"):
        sae.save(tmp_path / "out", format="saelens")
    assert not (tmp_path / "out").exists()


# ----- the encode command on a SAELens folder ------------------------------------------------------
def test_cli_encode_reads_a_saelens_folder(tmp_path, capsys):
    from saeengine.cli import main
    from saeengine.eval.encoded import EncodedDataset
    from saeengine.store import ActivationStore

    folder = fc.FIXTURES / "saelens" / "topk" / fc.SAE_DIR
    store = make_store(tmp_path / "store", 6, d_in=16)
    argv = ["encode", "--sae", str(folder), "--data", str(store), "--out", str(tmp_path / "out"),
            "--batch-tokens", "16", "--top-k", "3", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    encoded = EncodedDataset(tmp_path / "out")
    opened = ActivationStore(store)
    rows = np.arange(opened.n_tokens)
    values, indices = encoded.codes(rows)
    with torch.no_grad():
        code = SAE.from_pretrained(folder).encode(opened.get(rows).float())
    np.testing.assert_array_equal(indices, code.indices.numpy())
    np.testing.assert_allclose(values, code.values.numpy(), rtol=1e-6, atol=1e-6)
    assert encoded.summary["sae"]["dir"] == str(folder.resolve())
