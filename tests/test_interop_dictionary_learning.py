"""dictionary_learning's trainer folders (saeengine.interop.dictionary_learning) against
fixtures made by its own released package (tests/fixtures/make_dictionary_learning_fixtures.py):
every convertible class reproduces the peer's recorded encode/decode, the gated one is
refused, and bad folders raise CheckpointError naming the file and the field."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.errors import CheckpointError
from saeengine.interop import detect_formats, from_pretrained
from saeengine.interop import dictionary_learning as dl
from pickle_payload import SIDE_EFFECT, Payload

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import _fixture_common as fc  # noqa: E402

CASES = fc.cases("dictionary_learning")
BY_NAME = {case.name: case for case in CASES}
ARCH = {"standard": "relu", "standard_april": "relu", "topk": "topk", "batchtopk": "batchtopk",
        "matryoshka_batchtopk": "matryoshka", "jumprelu": "jumprelu", "gated": "jumprelu"}


def test_fixtures_exist():
    assert sorted(BY_NAME) == sorted(ARCH)


def _meta(case: Path) -> dict:
    return json.loads((case / fc.META).read_text())


@pytest.mark.parametrize("case", [c for c in CASES if _meta(c)["expect"] == "exact"], ids=lambda p: p.name)
def test_fixture_loads_exactly(case):
    folder = case / fc.SAE_DIR
    assert detect_formats(folder) == ["dictionary_learning"]
    sae = from_pretrained(folder, **_meta(case)["load"])
    assert sae.cfg.architecture == ARCH[case.name]
    assert sae.cfg.metadata["interop"]["peer"]["dict_class"] == _meta(case)["architecture"]
    fc.check_against_reference(sae, case)
    fc.check_against_reference(dl.load(folder / "ae.pt"), case)  # the weights file works too


def _state(name: str) -> dict:
    return torch.load(BY_NAME[name] / fc.SAE_DIR / "ae.pt", weights_only=True)


def test_thresholds_matter_in_the_fixtures():
    # the fixtures test what they claim: BatchTopK's and JumpReLU's thresholds switch off
    # latents that a plain ReLU of the same pre-activations (the peer's formulas, from the
    # raw state dicts) would keep, and TopK keeps exactly k
    x, acts, _, _ = fc.load_reference(BY_NAME["batchtopk"])
    s = _state("batchtopk")
    relu = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    assert bool(((relu > 0) & (relu <= s["threshold"])).any()) and bool((acts[relu <= s["threshold"]] == 0).all())
    x, acts, _, _ = fc.load_reference(BY_NAME["jumprelu"])
    s = _state("jumprelu")
    pre = x @ s["W_enc"] + s["b_enc"]
    off = (pre > 0) & (pre <= s["threshold"])
    assert bool(off.any()) and bool((acts[off] == 0).all())
    assert bool(((fc.load_reference(BY_NAME["topk"])[1] != 0).sum(1) == 6).all())


def test_from_pretrained_decoder_normalization_both_branches():
    # standard: unit decoder columns (the peer skips normalizing); april: not unit (it normalizes)
    unit = dl.load(BY_NAME["standard"] / fc.SAE_DIR).cfg.metadata["interop"]["peer"]
    april = dl.load(BY_NAME["standard_april"] / fc.SAE_DIR).cfg.metadata["interop"]["peer"]
    assert unit["decoder_normalized_on_load"] is False and april["decoder_normalized_on_load"] is True


def test_raw_state_dict_would_not_match_for_april():
    # without from_pretrained's normalization the codes differ: the check catches it
    case = BY_NAME["standard_april"]
    state = torch.load(case / fc.SAE_DIR / "ae.pt", weights_only=True)
    from saeengine.interop._common import build_sae

    raw = build_sae("relu", state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T, state["bias"])
    with pytest.raises(AssertionError, match="code values"):
        fc.check_against_reference(raw, case)


def test_matryoshka_prefixes_are_the_group_ends():
    sae = dl.load(BY_NAME["matryoshka_batchtopk"] / fc.SAE_DIR)
    groups = _state("matryoshka_batchtopk")["group_sizes"].tolist()
    assert sae.cfg.matryoshka_inner == "batchtopk" and sae.cfg.matryoshka_prefixes == (groups[0], sum(groups))


def test_gated_fixture_has_both_kinds_of_gate():
    # theta = b_mag - exp(r_mag) b_gate: the fixture holds gates above 0 (JumpReLU latents) and
    # at or below 0 (ReLU latents), and the gate switches off latents whose magnitude path
    # alone (a ReLU of m, the peer's formula on the raw state dict) would fire
    s = _state("gated")
    theta = s["mag_bias"] - s["r_mag"].exp() * s["gate_bias"]
    assert bool((theta > 0).any()) and bool((theta <= 0).any())
    x, acts, _, _ = fc.load_reference(BY_NAME["gated"])
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    magnitude = torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    gated_off = (magnitude > 0) & (x_enc + s["gate_bias"] <= 0)
    assert bool(gated_off.any()) and bool((acts[gated_off] == 0).all())


# ----- bad input ------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path) -> Path:
    target = tmp_path / "trainer_0"
    shutil.copytree(BY_NAME["batchtopk"] / fc.SAE_DIR, target)
    return target


def _edit_config(folder: Path, **trainer) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["trainer"].update(trainer)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_dict_class(folder):
    _edit_config(folder, dict_class="CrossCoder")
    with pytest.raises(CheckpointError, match=r"field 'trainer\.dict_class' = 'CrossCoder'"):
        dl.load(folder)


def test_config_shapes_disagreeing_with_weights(folder):
    _edit_config(folder, dict_size=128)
    with pytest.raises(CheckpointError, match=r"ae\.pt: tensor 'encoder\.weight' has shape \[64, 16\]"):
        dl.load(folder)


def test_k_disagreeing_with_buffer(folder):
    _edit_config(folder, k=7)
    with pytest.raises(CheckpointError, match=r"'trainer\.k' = 7 but ae\.pt's 'k' buffer is 6"):
        dl.load(folder)


def test_weights_of_another_class(folder):
    shutil.copy(BY_NAME["jumprelu"] / fc.SAE_DIR / "ae.pt", folder / "ae.pt")
    with pytest.raises(CheckpointError, match="BatchTopKSAE state dict holds"):
        dl.load(folder)


def test_missing_config_and_bad_json(folder):
    (folder / "config.json").write_text("{not json")
    assert not dl.detect(folder)
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        dl.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        dl.load(folder)
    with pytest.raises(CheckpointError, match="hookpoint"):
        dl.load(BY_NAME["topk"] / fc.SAE_DIR, hookpoint="resid_3")


def test_jumprelu_nonpositive_thresholds_are_relu_latents(tmp_path):
    # the peer's f = relu(pre * (pre > t)): a latent with t <= 0 fires wherever pre > 0.
    # Oracle: that formula on the raw state dict (dictionary_learning's JumpReluAutoEncoder).
    target = tmp_path / "jr"
    shutil.copytree(BY_NAME["jumprelu"] / fc.SAE_DIR, target)
    state = torch.load(target / "ae.pt", weights_only=True)
    state["threshold"][3], state["threshold"][5] = -0.1, 0.0
    torch.save(state, target / "ae.pt")
    x = fc.load_reference(BY_NAME["jumprelu"])[0]
    pre = x @ state["W_enc"] + state["b_enc"]
    expected = torch.relu(pre * (pre > state["threshold"]))
    assert bool((expected[:, 3] > 0).any())
    got, recon = fc.saeengine_outputs(dl.load(target), x)
    assert bool(((got != 0) == (expected != 0)).all())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, expected @ state["W_dec"] + state["b_dec"], atol=1e-5, rtol=1e-5)


def test_pickle_with_custom_class_refused_without_running(folder, tmp_path):
    marker = tmp_path / "marker.txt"
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "encoder.weight": Payload(marker)}, folder / "ae.pt")
    torch.load(folder / "ae.pt", weights_only=False)  # the probe works: an unsafe load runs it
    assert marker.read_text() == SIDE_EFFECT
    marker.unlink()
    assert dl.detect(folder)  # detection reads config.json only: nothing is unpickled
    with pytest.raises(CheckpointError, match=r"ae\.pt: refused.*execute code"):
        from_pretrained(folder)
    assert not marker.exists()


def test_checkpoint_file_in_checkpoints_folder(tmp_path):
    # trainSAE's save_steps write trainer_0/checkpoints/ae_<step>.pt; config.json is two levels up
    target = tmp_path / "trainer_0"
    shutil.copytree(BY_NAME["topk"] / fc.SAE_DIR, target)
    (target / "checkpoints").mkdir()
    shutil.copy(target / "ae.pt", target / "checkpoints" / "ae_100.pt")
    fc.check_against_reference(dl.load(target / "checkpoints" / "ae_100.pt"), BY_NAME["topk"])


def test_other_formats_are_not_dictionary_learning(tmp_path):
    # every other peer's fixture (folders and files) and saeengine's own checkpoint
    paths = [tmp_path / "native"]
    SAE(SAEConfig(d_in=8, d_sae=16, k=2), seed=0).save(paths[0])
    for peer in ('saev', 'overcomplete', 'saelens', 'sparsify'):
        for case in fc.cases(peer):
            paths += [case / fc.SAE_DIR, *(case / fc.SAE_DIR).rglob("*")]
    assert len(paths) > 40
    assert not [path for path in paths if dl.detect(path)]


def test_nan_threshold_refused(folder):
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "threshold": torch.tensor(float("nan"))}, folder / "ae.pt")
    with pytest.raises(CheckpointError, match=r"ae\.pt: tensor 'threshold' is nan"):
        dl.load(folder)
