"""overcomplete's SAE state dicts (saeengine.interop.overcomplete) against fixtures made by
its own released package (tests/fixtures/make_overcomplete_fixtures.py): TopK, BatchTopK
and JumpReLU reproduce the peer's recorded encode/decode (including its ">=" threshold
comparisons), a batch-norm encoder is refused, and bad files raise CheckpointError naming
the file and the field."""

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
from saeengine.interop import overcomplete as oc
from pickle_payload import SIDE_EFFECT, Payload

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import _fixture_common as fc  # noqa: E402

CASES = fc.cases("overcomplete")
BY_NAME = {case.name: case for case in CASES}
ARCH = {"topk": "topk", "topk_untied_l1": "topk", "topk_tied": "topk", "batchtopk": "batchtopk",
        "jumprelu": "jumprelu"}


def test_fixtures_exist():
    assert sorted(BY_NAME) == sorted([*ARCH, "mlp_bn"])
    assert not (BY_NAME["jumprelu"] / fc.SAE_DIR / oc.SIDECAR).exists()  # loads from the state dict alone


def _meta(case: Path) -> dict:
    return json.loads((case / fc.META).read_text())


@pytest.mark.parametrize("case", [c for c in CASES if _meta(c)["expect"] == "exact"], ids=lambda p: p.name)
def test_fixture_loads_exactly(case):
    folder = case / fc.SAE_DIR
    assert detect_formats(folder) == ["overcomplete"]
    sae = from_pretrained(folder, **_meta(case)["load"])
    assert sae.cfg.architecture == ARCH[case.name]
    fc.check_against_reference(sae, case)
    fc.check_against_reference(oc.load(folder / "sae.pt"), case)  # the file works too


def test_batch_norm_encoder_refused():
    with pytest.raises(CheckpointError, match=r"sae\.pt: encoder tensors \['encoder\.final_block\.1\.bias'"):
        from_pretrained(BY_NAME["mlp_bn"] / fc.SAE_DIR)


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(BY_NAME[name] / fc.SAE_DIR, target)
    return target


def _sidecar(folder: Path, **fields) -> None:
    path = folder / oc.SIDECAR
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    path.write_text(json.dumps(data))


def test_batchtopk_threshold_equal_to_a_code_is_kept(tmp_path):
    # overcomplete keeps codes >= running_threshold; saeengine keeps act > threshold, so the
    # converter stores the float32 just below. Set the threshold to exactly one recorded code:
    # the peer's rule (independent of the converter) keeps that code and drops the smaller ones.
    folder = _copy("batchtopk", tmp_path)
    x, acts, _, _ = fc.load_reference(BY_NAME["batchtopk"])
    positive = acts[acts > 0].sort().values
    t = float(positive[len(positive) // 2])
    _sidecar(folder, running_threshold=t)
    expected = torch.where(acts >= t, acts, torch.zeros_like(acts))
    assert bool((expected == t).any()) and 0 < int((expected > 0).sum()) < int((acts > 0).sum())
    got, _ = fc.saeengine_outputs(oc.load(folder), x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool(((got != 0) == (expected != 0)).all())


def test_topk_without_sidecar_refused(tmp_path):
    folder = _copy("topk", tmp_path)
    (folder / oc.SIDECAR).unlink()
    assert oc.detect(folder)  # its state dict is overcomplete's, so the refusal is overcomplete's
    with pytest.raises(CheckpointError, match=r"neither the class, top_k nor running_threshold.*overcomplete\.json"):
        oc.load(folder)


def test_unknown_class_and_normalization(tmp_path):
    folder = _copy("topk", tmp_path)
    _sidecar(folder, sae_class="MpSAE")
    with pytest.raises(CheckpointError, match=r"overcomplete\.json: field 'sae_class' = 'MpSAE'"):
        oc.load(folder)
    _sidecar(folder, sae_class="TopKSAE", dictionary_normalization="l3")
    with pytest.raises(CheckpointError, match=r"field 'dictionary_normalization' = 'l3'"):
        oc.load(folder)


def test_sidecar_fields_checked(tmp_path):
    folder = _copy("batchtopk", tmp_path)
    data = json.loads((folder / oc.SIDECAR).read_text())
    del data["running_threshold"]
    (folder / oc.SIDECAR).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="field 'running_threshold' is missing"):
        oc.load(folder)
    _sidecar(folder, running_threshold=float("nan"))
    with pytest.raises(CheckpointError, match="field 'running_threshold' = nan"):
        oc.load(folder)
    _sidecar(folder, sae_class="TopKSAE", top_k=65)
    with pytest.raises(CheckpointError, match="field 'top_k' = 65 > the 64 concepts"):
        oc.load(folder)
    _sidecar(folder, top_k="6")
    with pytest.raises(CheckpointError, match="field 'top_k' is '6'"):
        oc.load(folder)


def test_encoder_shape_disagreeing_with_dictionary(tmp_path):
    folder = _copy("topk", tmp_path)
    state = torch.load(folder / "sae.pt", weights_only=True)
    state["encoder.final_block.0.weight"] = state["encoder.final_block.0.weight"][:, :8]
    torch.save(state, folder / "sae.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'encoder\.final_block\.0\.weight' has shape \[64, 8\]"):
        oc.load(folder)


def test_extra_tensor_refused(tmp_path):
    folder = _copy("jumprelu", tmp_path)
    state = torch.load(folder / "sae.pt", weights_only=True)
    torch.save({**state, "dictionary.C": torch.zeros(3)}, folder / "sae.pt")
    with pytest.raises(CheckpointError, match=r"\['dictionary\.C'\]"):
        oc.load(folder)


def test_tied_encoder_must_be_the_dictionary(tmp_path):
    folder = _copy("topk_tied", tmp_path)
    state = torch.load(folder / "sae.pt", weights_only=True)
    torch.save({**state, "encoder.tied_to.multiplier": state["dictionary.multiplier"] + 1}, folder / "sae.pt")
    with pytest.raises(CheckpointError, match=r"'encoder\.tied_to\.\*' differ from 'dictionary\.\*'"):
        oc.load(folder)


def test_encoder_without_weights_refused(tmp_path):
    folder = _copy("topk", tmp_path)
    state = torch.load(folder / "sae.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("encoder.")}, folder / "sae.pt")
    with pytest.raises(CheckpointError, match="no encoder weights"):
        oc.load(folder)


def test_pickle_with_custom_class_refused_without_running(tmp_path):
    folder = _copy("jumprelu", tmp_path)
    marker = tmp_path / "marker.txt"
    state = torch.load(folder / "sae.pt", weights_only=True)
    torch.save({**state, "thresholds": Payload(marker)}, folder / "sae.pt")
    torch.load(folder / "sae.pt", weights_only=False)  # the probe works: an unsafe load runs it
    assert marker.read_text() == SIDE_EFFECT
    marker.unlink()
    assert oc.detect(folder)  # detection peeks at the pickle's bytes; it does not unpickle
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"sae\.pt: refused.*execute code"):
        from_pretrained(folder)
    assert not marker.exists()


def test_other_formats_are_not_overcomplete(tmp_path):
    # every other peer's fixture (folders and files) and saeengine's own checkpoint
    paths = [tmp_path / "native"]
    SAE(SAEConfig(d_in=8, d_sae=16, k=2), seed=0).save(paths[0])
    for peer in ('saev', 'dictionary_learning', 'saelens', 'sparsify'):
        for case in fc.cases(peer):
            paths += [case / fc.SAE_DIR, *(case / fc.SAE_DIR).rglob("*")]
    assert len(paths) > 40
    assert not [path for path in paths if oc.detect(path)]



def test_jumprelu_log_threshold_keeps_what_at_least_keeps():
    # saeengine fires where pre > exp(lt); JumpSAE where pre >= exp(log_t). For float32 pre,
    # the two agree when exp(lt) is the float32 just below exp(log_t); where exp cannot land
    # there, lt = log_t, which differs only at exact equality. Never a lower threshold.
    log_t = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 2
    lt = oc._at_least_log(log_t)
    t, got = torch.exp(log_t), torch.exp(lt)
    below = torch.nextafter(t, torch.zeros_like(t))
    assert bool(((got == below) | ((lt == log_t) & (got == t))).all())
    assert float((got == below).float().mean()) > 0.4
    # "below" is the largest float32 pre-activation the peer drops: saeengine drops it too
    assert not bool((below > got).any())
