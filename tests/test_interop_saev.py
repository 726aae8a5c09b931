"""saev's ``sae.pt`` (saeengine.interop.saev) against fixtures made by saev's own released
package (tests/fixtures/make_saev_fixtures.py): every fixture loads and reproduces saev's
recorded encode/decode; bad files raise CheckpointError naming the file and the field;
a pickle with a custom class is refused without running it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.errors import CheckpointError
from saeengine.interop import detect_formats, from_pretrained
from saeengine.interop import saev
from pickle_payload import SIDE_EFFECT, Payload

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import _fixture_common as fc  # noqa: E402

CASES = fc.cases("saev")


def test_fixtures_exist():
    # the committed fixtures (made by saev itself) are what every test below reads
    assert [case.name for case in CASES] == ["relu", "relu_unit_decoder"]


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_fixture_loads_exactly(case):
    meta = json.loads((case / fc.META).read_text())
    folder = case / fc.SAE_DIR
    assert detect_formats(folder) == ["saev"]
    sae = SAE.from_pretrained(folder, **meta["load"])  # the public entry point
    assert sae.cfg.architecture == "relu" and sae.cfg.normalization == "none"
    assert sae.cfg.metadata["interop"]["format"] == "saev"
    # the run's preprocessing (saev normalizes in its data loader) is reported with the SAE
    assert sae.cfg.metadata["interop"]["peer"]["data"]["scale_norm"] is True
    fc.check_against_reference(sae, case)
    # the file itself works as well as its folder
    fc.check_against_reference(saev.load(folder / "sae.pt"), case)
    fc.check_against_reference(from_pretrained(folder / "sae.pt", format="saev"), case)


def test_unit_decoder_fixture_is_unit_and_reported():
    sae = saev.load(CASES[1] / fc.SAE_DIR)
    assert sae.cfg.metadata["interop"]["decoder_row_norms"] == "unit"
    assert saev.load(CASES[0] / fc.SAE_DIR).cfg.metadata["interop"]["decoder_row_norms"] == "not unit"


def test_reference_is_not_trivially_met():
    # the check would catch a wrong conversion: an SAE that skips x - b_dec (saev subtracts it) fails
    case = CASES[1]
    sae = saev.load(case / fc.SAE_DIR)
    with torch.no_grad():
        sae.b_enc += sae.b_dec @ sae.W_enc.T  # = no b_dec subtraction
    with pytest.raises(AssertionError):
        fc.check_against_reference(sae, case)


# ----- bad input ------------------------------------------------------------------------------
def _split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    end = raw.index(b"\n")
    return json.loads(raw[:end]), raw[end + 1:]


def _write(tmp_path: Path, header: dict, body: bytes) -> Path:
    file = tmp_path / "sae.pt"
    file.write_bytes(json.dumps(header).encode() + b"\n" + body)
    return file


@pytest.fixture
def parts():
    return _split(CASES[0] / fc.SAE_DIR / "sae.pt")


def test_config_shapes_disagreeing_with_weights(tmp_path, parts):
    header, body = parts
    file = _write(tmp_path, {**header, "exp_factor": header["exp_factor"] * 2}, body)
    with pytest.raises(CheckpointError, match=r"sae\.pt.*tensor 'W_enc' has shape"):
        saev.load(file)


def test_later_schema_refused(tmp_path, parts):
    header, body = parts
    file = _write(tmp_path, {"schema": 2, "cfg": header, "commit": "abc", "lib": "1.0.0"}, body)
    assert saev.detect(file)  # it is saev's layout, so the refusal comes from saev's reader
    with pytest.raises(CheckpointError, match=r"sae\.pt: config line field 'schema' = 2"):
        saev.load(file)


def test_unknown_config_field_refused(tmp_path, parts):
    header, body = parts
    file = _write(tmp_path, {**header, "activation": "TopK"}, body)
    with pytest.raises(CheckpointError, match=r"fields \['activation'\]"):
        saev.load(file)


def test_bad_field_type(tmp_path, parts):
    header, body = parts
    file = _write(tmp_path, {**header, "d_vit": "16"}, body)
    with pytest.raises(CheckpointError, match="field 'd_vit'"):
        saev.load(file)


def test_extra_tensor_refused(tmp_path, parts):
    header, _ = parts
    state = fc_state(CASES[0])
    state["W_skip"] = torch.zeros(2)
    file = tmp_path / "body.pt"
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"\['W_skip'\]"):
        saev.load(_write(tmp_path, header, file.read_bytes()))


def fc_state(case: Path) -> dict:
    import io

    _, body = _split(case / fc.SAE_DIR / "sae.pt")
    return torch.load(io.BytesIO(body), weights_only=True)


def test_truncated_state_dict(tmp_path, parts):
    header, body = parts
    file = _write(tmp_path, header, body[: len(body) // 2])
    with pytest.raises(CheckpointError, match=r"sae\.pt: cannot be read as a torch file"):
        saev.load(file)


def test_not_saev_files(tmp_path):
    (tmp_path / "sae.pt").write_bytes(b"\x80\x04no json line here")
    assert not saev.detect(tmp_path)
    with pytest.raises(CheckpointError, match="JSON config line"):
        saev.load(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        saev.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="hookpoint"):
        saev.load(CASES[0] / fc.SAE_DIR, hookpoint="layers.3")


def test_pickle_with_custom_class_refused_without_running(tmp_path, parts):
    header, _ = parts
    marker = tmp_path / "marker.txt"
    body = tmp_path / "body.pt"
    torch.save({"W_enc": Payload(marker)}, body)
    # the probe works: an unsafe load would run the payload
    torch.load(body, weights_only=False)
    assert marker.read_text() == SIDE_EFFECT
    marker.unlink()
    file = _write(tmp_path, header, body.read_bytes())
    with pytest.raises(CheckpointError, match=r"sae\.pt: refused.*execute code"):
        saev.load(file)
    assert not marker.exists()


def test_other_formats_are_not_saev(tmp_path):
    # every other peer's fixture (folders and files) and saeengine's own checkpoint
    paths = [tmp_path / "native"]
    SAE(SAEConfig(d_in=8, d_sae=16, k=2), seed=0).save(paths[0])
    for peer in ('dictionary_learning', 'overcomplete', 'saelens', 'sparsify'):
        for case in fc.cases(peer):
            paths += [case / fc.SAE_DIR, *(case / fc.SAE_DIR).rglob("*")]
    assert len(paths) > 40
    assert not [path for path in paths if saev.detect(path)]
