"""Hostile inputs to SAEConfig, SAE checkpoints, fit_normalization and the SAE's inputs
(issue 14, classes 2, 4 and 5): each a clear error naming the field, the value and the
fix, or a documented behaviour; none silent."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import saeengine.checkpoint as ck
from saeengine import SAE, SAEConfig
from saeengine.architectures import DenseCode
from saeengine.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from saeengine.ops.code import SparseCode

from conftest import assert_same_saved_sae
from hostile import case, hostile_table

D, F, K = 6, 16, 3
FIELDS = [f.name for f in dataclasses.fields(SAEConfig)]
TOP_FIELDS = list(ck._FIELDS[ck.FORMAT_VERSION])


# ----- builders -------------------------------------------------------------------------
def make_sae(normalization="mean_norm", **fields) -> SAE:
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=K, normalization=normalization, **fields), seed=0)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(F, generator=torch.Generator().manual_seed(1)))
    sae.fit_normalization(torch.randn(64, D, generator=torch.Generator().manual_seed(2)) * 2 + 1)
    return sae


def saved(tmp: Path, name: str = "ckpt", **fields) -> Path:
    return make_sae(**fields).save(tmp / name)


def config_of(path: Path) -> dict:
    return json.loads((path / ck.CONFIG_FILE).read_text())


def write_config(path: Path, data) -> None:
    (path / ck.CONFIG_FILE).write_text(json.dumps(data))


def load_edited(edit):
    """Save an SAE, apply edit(config.json's dict), load."""
    def run(tmp):
        path = saved(tmp)
        data = config_of(path)
        edit(data)
        write_config(path, data)
        return SAE.load(path)
    return run


def rewrite_weights(path: Path, mutate, declare: bool = False) -> None:
    """Replace the weights by mutate(tensors), keeping the header and recording the new
    file's size and checksum (a file that passes the checksum: crafted, or from a bug);
    ``declare`` also updates config.json's declared tensors."""
    weights = path / ck.WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(weights))
    mutate(tensors)
    save_file(tensors, str(weights), metadata=header)
    data = config_of(path)
    data["weights"].update(bytes=weights.stat().st_size, sha256=ck._sha256(weights))
    if declare:
        data["tensors"] = {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                           for n, t in tensors.items()}
    write_config(path, data)


def load_rewritten(mutate, declare=False, **fields):
    def run(tmp):
        path = saved(tmp, **fields)
        rewrite_weights(path, mutate, declare)
        return SAE.load(path)
    return run


def as_format_1(path: Path, drop: tuple[str, ...] = ()) -> None:
    """Rewrite a checkpoint as format version 1 wrote it: no checksum, no config in the
    weights' header; ``drop`` removes SAEConfig fields that did not exist yet."""
    data = config_of(path)
    data["format_version"] = 1
    del data["weights"]
    for name in drop:
        del data["config"][name]
    write_config(path, data)
    weights = path / ck.WEIGHTS_FILE
    save_file(load_file(str(weights)), str(weights), metadata={"format": ck.FORMAT,
                                                                "checkpoint_id": data["checkpoint_id"]})


def load_format_1(edit=None, drop=(), **fields):
    def run(tmp):
        path = saved(tmp, **fields)
        as_format_1(path, drop)
        if edit is not None:
            edit(path)
        return SAE.load(path)
    return run


def flip_byte(offset_of):
    """Flip one bit of sae.safetensors at offset_of(header_length, file_size), then load."""
    def run(tmp):
        path = saved(tmp)
        weights = path / ck.WEIGHTS_FILE
        raw = bytearray(weights.read_bytes())
        header_len = int.from_bytes(raw[:8], "little")
        offset = offset_of(header_len, len(raw))
        at = raw.find(config_of(path)["checkpoint_id"].encode())
        assert not at <= offset < at + 32, "a flip in the checkpoint_id reads as 'different saves'"
        raw[offset] ^= 0x10
        weights.write_bytes(bytes(raw))
        return SAE.load(path)
    return run


def truncate(keep):
    def run(tmp):
        path = saved(tmp)
        weights = path / ck.WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:keep(weights.stat().st_size)])
        return SAE.load(path)
    return run


def weights_of_other_save(tmp):
    a, b = saved(tmp, "a"), saved(tmp, "b")
    (a / ck.WEIGHTS_FILE).write_bytes((b / ck.WEIGHTS_FILE).read_bytes())
    return SAE.load(a)


def config_of_other_save(tmp):
    a, b = saved(tmp, "a"), saved(tmp, "b")
    (a / ck.CONFIG_FILE).write_bytes((b / ck.CONFIG_FILE).read_bytes())
    return SAE.load(a)


def crash_between_renames(tmp):
    """A second save killed after config.json's rename, before the weights' rename."""
    path = saved(tmp)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == ck.WEIGHTS_FILE:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    with mock.patch.object(os, "replace", replace):
        try:
            make_sae(normalization="none").save(path)
        except KeyboardInterrupt:
            pass
    return SAE.load(path)


def poisoned(name, value):
    def run(tmp):
        sae = make_sae()
        with torch.no_grad():
            getattr(sae, name).view(-1)[1 if getattr(sae, name).numel() > 1 else 0] = value
        return sae.save(tmp / "poisoned")
    return run


def fit(sample, normalization="mean_norm"):
    return lambda tmp: make_sae(normalization).fit_normalization(sample() if callable(sample) else sample)


def with_nan_row(row, value=float("nan"), n=8, dtype=torch.float32):
    x = torch.randn(n, D, dtype=dtype)
    x[row, 2] = value
    return x


def sae_call(method, x, **kwargs):
    return lambda tmp: getattr(make_sae(), method)(x() if callable(x) else x, **kwargs)


# ----- checks of documented behaviour ---------------------------------------------------
def same_as_saved(**fields):
    def check(loaded, tmp):
        assert_same_saved_sae(make_sae(**fields), loaded)
    return check


def check_metadata_edit(loaded, tmp):
    assert loaded.cfg.metadata == {"note": "edited by hand"}


def check_normalized(cfg, tmp):
    assert type(cfg.k) is int and cfg.k == 3 and cfg.matryoshka_prefixes == (4, 16)
    assert type(cfg.aux_alpha) is float


def check_unset_threshold(loaded, tmp):
    assert torch.isnan(loaded.threshold) and loaded.cfg.architecture == "batchtopk"


def edit_config_field(name, value):
    def edit(data):
        data["config"][name] = value
    return edit


def edit(path_keys, value=None, delete=False):
    """An edit of config.json at the nested keys path_keys."""
    def apply(data):
        node = data
        for key in path_keys[:-1]:
            node = node[key]
        if delete:
            del node[path_keys[-1]]
        else:
            node[path_keys[-1]] = value
    return apply


def cfg(**fields):
    return lambda tmp: SAEConfig(**{"d_in": D, "d_sae": F, "k": K, **fields})


def bad_config(id, error_phrases, **fields):
    return case(f"config-{id}", cfg(**fields), ConfigError, *error_phrases)


CASES = [
    # --- SAEConfig: every field's bad types and ranges (class 4) ------------------------
    bad_config("d_in-zero", ["SAEConfig.d_in=0", "an int >= 1"], d_in=0),
    bad_config("d_in-bool", ["SAEConfig.d_in=True", "not a bool"], d_in=True),
    bad_config("d_in-str", ["SAEConfig.d_in='768'", "not a str"], d_in="768"),
    bad_config("d_sae-float", ["SAEConfig.d_sae=16.0", "not a float"], d_sae=16.0),
    bad_config("d_sae-negative", ["SAEConfig.d_sae=-4", ">= 1"], d_sae=-4),
    bad_config("architecture-unknown", ["architecture='gated'", "choose one of", "'matryoshka'"], architecture="gated"),
    bad_config("architecture-none", ["architecture=None", "choose one of"], architecture=None),
    bad_config("k-zero", ["SAEConfig.k=0", "1 <= k <= d_sae=16"], k=0),
    bad_config("k-above-d_sae", ["SAEConfig.k=17 exceeds d_sae=16"], k=17),
    bad_config("k-bool", ["SAEConfig.k=True", "not a bool"], k=True),
    bad_config("k-str", ["SAEConfig.k='3'", "not a str"], k="3"),
    bad_config("dtype-float64", ["dtype='float64'", "('float32', 'float16', 'bfloat16')"], dtype="float64"),
    bad_config("dtype-torch", ["dtype=torch.float32", "choose one of"], dtype=torch.float32),
    bad_config("normalization-unknown", ["normalization='zscore'", "('none', 'mean_norm')"], normalization="zscore"),
    bad_config("k_aux-zero", ["SAEConfig.k_aux=0", "[1, d_sae=16]"], k_aux=0),
    bad_config("k_aux-above", ["SAEConfig.k_aux=17", "[1, d_sae=16]"], k_aux=17),
    bad_config("k_aux-float", ["SAEConfig.k_aux=2.5", "not a float"], k_aux=2.5),
    bad_config("aux_alpha-negative", ["SAEConfig.aux_alpha=-0.1", ">= 0"], aux_alpha=-0.1),
    bad_config("aux_alpha-nan", ["SAEConfig.aux_alpha=nan", "finite"], aux_alpha=float("nan")),
    bad_config("aux_alpha-inf", ["SAEConfig.aux_alpha=inf", "finite"], aux_alpha=float("inf")),
    bad_config("aux_alpha-str", ["SAEConfig.aux_alpha='0.03'", "not a str"], aux_alpha="0.03"),
    # Checked for every architecture, not only the one that reads it.
    bad_config("jumprelu_threshold-zero-on-topk", ["jumprelu_threshold=0.0", "positive number"],
               jumprelu_threshold=0.0),
    bad_config("jumprelu_bandwidth-negative", ["jumprelu_bandwidth=-0.001", "positive number"],
               architecture="jumprelu", jumprelu_bandwidth=-1e-3),
    bad_config("jumprelu_threshold-inf", ["jumprelu_threshold=inf", "positive number"], architecture="jumprelu",
               jumprelu_threshold=float("inf")),
    bad_config("matryoshka_inner-relu", ["matryoshka_inner='relu'", "('topk', 'batchtopk')"],
               matryoshka_inner="relu"),
    bad_config("matryoshka_prefixes-str", ["matryoshka_prefixes='4,16'", "a tuple of ints"],
               matryoshka_prefixes="4,16"),
    bad_config("matryoshka_prefixes-descending", ["matryoshka_prefixes=(8, 4, 16)", "strictly ascending"],
               architecture="matryoshka", matryoshka_prefixes=(8, 4, 16)),
    bad_config("matryoshka_prefixes-short", ["matryoshka_prefixes=(4, 8)", "ending at d_sae=16"],
               architecture="matryoshka", matryoshka_prefixes=(4, 8)),
    bad_config("matryoshka_random_prefixes-zero", ["matryoshka_random_prefixes=0", "[1, d_sae=16]"],
               architecture="matryoshka", matryoshka_random_prefixes=0),
    bad_config("matryoshka_random_prefixes-float", ["matryoshka_random_prefixes=2.0", "not a float"],
               matryoshka_random_prefixes=2.0),
    bad_config("metadata-list", ["SAEConfig.metadata=[1]", "a dict"], metadata=[1]),
    bad_config("metadata-not-json", ["SAEConfig.metadata is not JSON-serializable", "config.json"],
               metadata={"layer": object()}),
    bad_config("metadata-int-key", ["SAEConfig.metadata has non-str keys [1]"], metadata={1: "a"}),
    case("config-numpy-and-list-values-normalized",
         cfg(k=np.int64(3), architecture="matryoshka", matryoshka_prefixes=[4, 16], aux_alpha=np.float32(0.5)),
         None, check=check_normalized),
    case("config-from_dict-missing", lambda tmp: SAEConfig.from_dict({"d_in": D, "d_sae": F}), ConfigError,
         "SAEConfig fields missing", "'k'", "none takes a default"),
    case("config-from_dict-unknown", lambda tmp: SAEConfig.from_dict({**make_sae().cfg.to_dict(), "gated": 1}),
         ConfigError, "unknown SAEConfig fields ['gated']"),

    # --- config.json: every field missing, wrong-typed or edited (class 5) --------------
    *[case(f"json-config-missing-{name}", load_edited(edit(["config", name], delete=True)), CheckpointError,
           "config.json", "field 'config' is invalid", f"'{name}'", "none takes a default") for name in FIELDS],
    *[case(f"json-missing-{name}", load_edited(edit([name], delete=True)), CheckpointError, "config.json",
           f"field '{name}' is missing") for name in TOP_FIELDS],
    case("json-unknown-top-field", load_edited(edit(["extra"], 1)), CheckpointError, "config.json",
         "unknown fields ['extra']"),
    case("json-unknown-config-field", load_edited(edit(["config", "gated"], True)), CheckpointError,
         "config.json", "unknown SAEConfig fields ['gated']"),
    case("json-format_version-str", load_edited(edit(["format_version"], "2")), CheckpointError,
         "field 'format_version' is '2' (a str)", "expected an int >= 1"),
    case("json-format_version-bool", load_edited(edit(["format_version"], True)), CheckpointError,
         "field 'format_version' is True (a bool)"),
    case("json-format_version-zero", load_edited(edit(["format_version"], 0)), CheckpointError,
         "field 'format_version' is 0"),
    case("json-format_version-newer", load_edited(edit(["format_version"], ck.FORMAT_VERSION + 1)), CheckpointError,
         f"'format_version' is {ck.FORMAT_VERSION + 1}", f"reads up to {ck.FORMAT_VERSION}", "upgrade saeengine"),
    case("json-format-other", load_edited(edit(["format"], "sparsify")), CheckpointError,
         "field 'format' is 'sparsify'", "expected 'saeengine.sae'"),
    case("json-config-list", load_edited(edit(["config"], [1, 2])), CheckpointError,
         "field 'config' is [1, 2] (a list)", "expected a JSON object"),
    case("json-tensors-str", load_edited(edit(["tensors"], "W_enc")), CheckpointError,
         "field 'tensors' is 'W_enc' (a str)"),
    case("json-checkpoint_id-int", load_edited(edit(["checkpoint_id"], 7)), CheckpointError,
         "field 'checkpoint_id' is 7 (an int)", "expected a str"),
    case("json-provenance-list", load_edited(edit(["provenance"], [])), CheckpointError,
         "field 'provenance' is [] (a list)"),
    case("json-config-k-str", load_edited(edit_config_field("k", "3")), CheckpointError,
         "config.json: field 'config' is invalid", "SAEConfig.k='3'", "not a str"),
    case("json-config-d_in-null", load_edited(edit_config_field("d_in", None)), CheckpointError,
         "field 'config' is invalid", "SAEConfig.d_in=None"),
    case("json-config-k-edited", load_edited(edit_config_field("k", 4)), CheckpointError,
         "field 'config' was edited after the save", "k=4 (saved: 3)", "restore config.json"),
    case("json-config-architecture-edited", load_edited(edit_config_field("architecture", "relu")), CheckpointError,
         "was edited after the save", "architecture='relu' (saved: 'topk')"),
    case("json-config-aux_alpha-edited", load_edited(edit_config_field("aux_alpha", 0.5)), CheckpointError,
         "was edited after the save", "aux_alpha=0.5"),
    case("json-config-d_sae-edited", load_edited(edit_config_field("d_sae", 17)), CheckpointError,
         "tensor 'W_dec' has shape (16, 6)", "d_sae=17", "implies (17, 6)"),
    case("json-config-dtype-edited", load_edited(edit_config_field("dtype", "bfloat16")), CheckpointError,
         "tensor 'W_dec' has dtype torch.float32", "field 'dtype' implies torch.bfloat16"),
    case("json-normalization-block-edited", load_edited(edit(["normalization", "kind"], "none")), CheckpointError,
         "field 'normalization' is", "normalization='mean_norm'", "restore it"),
    case("json-normalization-block-bad", load_edited(edit(["normalization"], {"kind": "mean_norm"})),
         CheckpointError, "field 'normalization'", '{"kind": str, "present": bool}'),
    case("json-normalization-dropped",  # both places edited to "none": the saved statistics would be dropped
         load_edited(lambda d: (edit(["config", "normalization"], "none")(d),
                                edit(["normalization"], {"kind": "none", "present": False})(d))),
         CheckpointError, "normalization='none' (saved: 'mean_norm')"),
    case("json-tensor-shape-edited", load_edited(edit(["tensors", "W_enc", "shape"], [16, 7])), CheckpointError,
         "field 'tensors' declares 'W_enc' as [16, 7] float32", "holds [16, 6] float32"),
    case("json-tensor-dtype-edited", load_edited(edit(["tensors", "b_dec", "dtype"], "float16")), CheckpointError,
         "declares 'b_dec' as [6] float16"),
    case("json-tensor-undeclared", load_edited(edit(["tensors", "b_enc"], delete=True)), CheckpointError,
         "field 'tensors' declares", "holds ['W_dec', 'W_enc', 'b_dec', 'b_enc'"),
    case("json-tensor-shape-str", load_edited(edit(["tensors", "W_enc", "shape"], "16x6")), CheckpointError,
         "field 'tensors.W_enc'", '"shape": [ints >= 0]'),
    case("json-weights-sha-edited", load_edited(edit(["weights", "sha256"], "0" * 64)), CheckpointError,
         "sae.safetensors: corrupted: checksum mismatch"),
    case("json-weights-sha-not-hex", load_edited(edit(["weights", "sha256"], "xyz")), CheckpointError,
         "field 'weights'", "64 hex digits"),
    case("json-weights-bytes-str", load_edited(edit(["weights", "bytes"], "100")), CheckpointError,
         "field 'weights'", '"bytes": int'),
    case("json-metadata-edited", load_edited(edit(["config", "metadata"], {"note": "edited by hand"})), None,
         check=check_metadata_edit),  # documented: free-form provenance, not verified
    case("json-provenance-edited", load_edited(edit(["provenance", "note"], "x")), None, check=same_as_saved()),
    case("json-not-an-object", lambda tmp: (write_config(saved(tmp), [1]), SAE.load(tmp / "ckpt")),
         CheckpointError, "config.json: expected a JSON object, got a list"),
    case("json-empty-object", lambda tmp: (write_config(saved(tmp), {}), SAE.load(tmp / "ckpt")),
         CheckpointError, "config.json: field 'format' is missing"),
    case("json-truncated", lambda tmp: ((saved(tmp) / ck.CONFIG_FILE).write_text('{"format": "sae'),
                                        SAE.load(tmp / "ckpt")), CheckpointError, "config.json: not valid JSON"),
    case("load-a-file-not-its-folder", lambda tmp: SAE.load(saved(tmp) / ck.WEIGHTS_FILE), CheckpointError,
         "not a directory", "pass its folder"),

    # --- sae.safetensors: flipped bytes, truncation, replaced files --------------------
    case("bytes-flip-header-length", flip_byte(lambda h, n: 1), CheckpointError,
         "sae.safetensors: corrupted: checksum mismatch"),
    case("bytes-flip-header-json", flip_byte(lambda h, n: 8 + 3), CheckpointError, "corrupted: checksum mismatch"),
    case("bytes-flip-header-end", flip_byte(lambda h, n: 8 + h - 2), CheckpointError, "checksum mismatch"),
    case("bytes-flip-data-first", flip_byte(lambda h, n: 8 + h), CheckpointError, "corrupted: checksum mismatch"),
    case("bytes-flip-data-middle", flip_byte(lambda h, n: (8 + h + n) // 2), CheckpointError, "checksum mismatch"),
    case("bytes-flip-data-last", flip_byte(lambda h, n: n - 1), CheckpointError, "sae.safetensors: corrupted"),
    case("bytes-truncated", truncate(lambda n: n - 7), CheckpointError, "sae.safetensors: truncated",
         f"but", "records"),
    case("bytes-empty", truncate(lambda n: 0), CheckpointError, "truncated or replaced: it has 0 bytes"),
    case("bytes-garbage-same-size", lambda tmp: ((saved(tmp) / ck.WEIGHTS_FILE).write_bytes(
        b"\x07" * (tmp / "ckpt" / ck.WEIGHTS_FILE).stat().st_size), SAE.load(tmp / "ckpt")), CheckpointError,
        "corrupted: checksum mismatch"),
    case("bytes-missing", lambda tmp: ((saved(tmp) / ck.WEIGHTS_FILE).unlink(), SAE.load(tmp / "ckpt")),
         CheckpointError, "sae.safetensors: missing"),

    # --- pairs from different saves (checkpoint_id) -----------------------------------
    case("pair-weights-of-other-save", weights_of_other_save, CheckpointError, "come from different saves"),
    case("pair-config-of-other-save", config_of_other_save, CheckpointError, "come from different saves"),
    case("pair-crash-between-renames", crash_between_renames, CheckpointError, "come from different saves",
         "interrupted between its two files"),

    # --- tensors that pass the checksum but not the checks (crafted, or a bug) ---------
    case("tensors-nan-weight", load_rewritten(lambda t: t["W_enc"].view(-1).__setitem__(3, float("nan"))),
         CheckpointError, "'W_enc' (1 of 96 values)", "NaN or inf", "train it again"),
    case("tensors-inf-norm-mean", load_rewritten(lambda t: t["norm_mean"].__setitem__(0, float("inf"))),
         CheckpointError, "'norm_mean'", "NaN or inf"),
    case("tensors-zero-norm-scale", load_rewritten(lambda t: t["norm_scale"].zero_()), CheckpointError,
         "norm_scale is 0.0", "must be > 0"),
    case("tensors-extra", load_rewritten(lambda t: t.update(extra=torch.zeros(2)), declare=True), CheckpointError,
         "unexpected tensors ['extra']"),
    case("tensors-missing", load_rewritten(lambda t: t.pop("b_enc"), declare=True), CheckpointError,
         "tensor 'b_enc' is missing"),
    case("tensors-wrong-shape", load_rewritten(lambda t: t.update(b_dec=torch.zeros(D + 1)), declare=True),
         CheckpointError, "tensor 'b_dec' has shape (7,)", "implies (6,)"),
    case("tensors-header-without-config", lambda tmp: SAE.load(_strip_header_config(saved(tmp))), CheckpointError,
         "header lacks the config it was saved with"),
    case("tensors-unset-batchtopk-threshold-loads",  # documented: NaN marks "not set yet" in that buffer only
         lambda tmp: SAE.load(SAE(SAEConfig(d_in=D, d_sae=F, k=K, architecture="batchtopk"), seed=0).save(tmp / "b")),
         None, check=check_unset_threshold),

    # --- saving a poisoned SAE (class 2: never saved as a good one) --------------------
    case("save-nan-parameter", poisoned("W_dec", float("nan")), NonFiniteError, "refusing to save a poisoned SAE",
         "'W_dec' (1 of 96 values)", "nothing was written"),
    case("save-inf-norm-scale", poisoned("norm_scale", float("inf")), NonFiniteError, "'norm_scale'"),
    case("save-inf-batchtopk-threshold", lambda tmp: _batchtopk_with_threshold(float("inf")).save(tmp / "b"),
         NonFiniteError, "'threshold'"),
    case("save-provenance-not-json", lambda tmp: make_sae().save(tmp / "p", provenance={"path": Path("/x")}),
         CheckpointError, "provenance is not JSON-serializable"),
    case("save-onto-a-file", lambda tmp: make_sae().save(_a_file(tmp)), CheckpointError, "is a file",
         "writes a folder"),

    # --- format version 1 (no checksum): loads, warned ----------------------------------
    case("v1-loads-unverified", load_format_1(), None, "unverified", "save it again", warns=UserWarning,
         check=same_as_saved()),
    case("v1-without-later-fields", load_format_1(drop=tuple(ck.LEGACY_V1_FIELDS)), None, "matryoshka_inner",
         "jumprelu_bandwidth", warns=UserWarning, check=same_as_saved()),
    case("v1-missing-k", load_format_1(drop=("k",)), CheckpointError, "field 'config' is invalid", "['k']"),
    case("v1-matryoshka-missing-its-fields", load_format_1(drop=("matryoshka_inner",), architecture="matryoshka"),
         CheckpointError, "['matryoshka_inner']"),
    case("v1-truncated", load_format_1(edit=lambda p: (p / ck.WEIGHTS_FILE).write_bytes(
        (p / ck.WEIGHTS_FILE).read_bytes()[:-50])), CheckpointError, "sae.safetensors: unreadable", "truncated"),
    case("v1-nan-weights", load_format_1(edit=lambda p: _v1_poison(p)), CheckpointError, "'b_enc'", "NaN or inf"),
    case("v1-normalization-edited-to-none", load_format_1(edit=lambda p: _v1_set_none(p)), CheckpointError,
         "normalization='none'", "fitted normalization statistics", "restore normalization='mean_norm'"),

    # --- fit_normalization (class 2) ----------------------------------------------------
    case("fit-nan", fit(lambda: with_nan_row(5)), NonFiniteError, "sample has 1 non-finite", "row 5", "nan"),
    case("fit-inf", fit(lambda: with_nan_row(0, float("-inf"))), NonFiniteError, "row 0", "-inf"),
    case("fit-float64-overflows-float32", fit(lambda: with_nan_row(3, 1e39, dtype=torch.float64)), NonFiniteError,
         "row 3"),
    case("fit-spread-overflows", fit(lambda: torch.tensor([[3e38] * D, [-3e38] * D])), NonFiniteError,
         "overflows float32"),
    case("fit-nan-with-normalization-none", fit(lambda: with_nan_row(2), normalization="none"), NonFiniteError,
         "row 2"),
    case("fit-empty", fit(lambda: torch.zeros(0, D)), DataError, "sample has 0 rows", "at least 2 rows"),
    case("fit-empty-normalization-none", fit(lambda: torch.zeros(0, D), normalization="none"), DataError,
         "sample has 0 rows"),
    case("fit-one-row", fit(lambda: torch.randn(1, D)), DataError, "sample has 1 rows", "at least 2"),
    case("fit-constant-rows", fit(lambda: torch.full((50, D), 0.1)), DataError, "all equal", "divide"),
    case("fit-zero-rows-of-zeros", fit(lambda: torch.zeros(10, D)), DataError, "all equal"),
    case("fit-wrong-width", fit(lambda: torch.randn(10, D + 1)), ValueError, "sample has 7 columns", "d_in=6"),
    case("fit-int-dtype", fit(lambda: torch.ones(10, D, dtype=torch.int64)), TypeError, "sample has dtype torch.int64"),

    # --- SAE inputs not covered by tests/test_errors.py --------------------------------
    case("x-nan-row", sae_call("encode", lambda: with_nan_row(3)), NonFiniteError, "row 3", "check=False"),
    case("x-fp16-inf", sae_call("__call__", lambda: with_nan_row(1, float("inf"), dtype=torch.float16)),
         NonFiniteError, "row 1", "inf"),
    case("x-3d", sae_call("encode", torch.randn(2, 3, D)), ValueError, "must be 2-D [N, d_in=6]", "(2, 3, 6)"),
    case("x-list", sae_call("encode", [[0.0] * D]), TypeError, "x must be a torch.Tensor, got list"),
    case("x-int", sae_call("encode", torch.ones(3, D, dtype=torch.int64)), TypeError, "x has dtype torch.int64"),
    case("forward-one-row", sae_call("__call__", torch.randn(1, D)), DataError, "N >= 2", "sae.decode(sae.encode(x))"),
    case("forward-k-float", sae_call("__call__", torch.randn(4, D), k=2.0), ValueError, "k=2.0", "an int"),
    case("forward-k-above", sae_call("__call__", torch.randn(4, D), k=F + 1), ValueError, "[1, d_sae=16]"),
    case("encode-backend-unknown", sae_call("encode", torch.randn(4, D), backend="bogus"), ValueError,
         "backend='bogus'"),
    case("decode-a-tensor", sae_call("decode", torch.rand(2, F)), TypeError, "a SparseCode or a DenseCode",
         "DenseCode(values)"),
    case("decode-index-out-of-range", sae_call("decode", SparseCode(torch.rand(2, 3), torch.tensor([[0, 1, 16]] * 2))),
         IndexError, "must lie in [0, 15]"),
    case("decode-dense-wrong-width", sae_call("decode", DenseCode(torch.rand(2, F + 1))), ValueError,
         "code.values has 17 columns but 16 are expected [N, d_sae=16]"),
]


def _strip_header_config(path: Path) -> Path:
    weights = path / ck.WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as fh:
        header = {k: v for k, v in fh.metadata().items() if k != "sae_config"}
    save_file(load_file(str(weights)), str(weights), metadata=header)
    rewrite_weights(path, lambda t: None)
    return path


def _batchtopk_with_threshold(value):
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=K, architecture="batchtopk"), seed=0)
    sae.threshold.fill_(value)
    return sae


def _v1_poison(path: Path) -> None:
    weights = path / ck.WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(weights))
    tensors["b_enc"][0] = float("nan")
    save_file(tensors, str(weights), metadata=header)


def _v1_set_none(path: Path) -> None:
    data = config_of(path)
    data["config"]["normalization"] = "none"
    data["normalization"] = {"kind": "none", "present": False}
    write_config(path, data)


def _a_file(tmp: Path) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f"


test_hostile = hostile_table(CASES)


def test_failed_fit_keeps_the_statistics():
    sae = make_sae()
    before = sae.norm_mean.clone(), sae.norm_scale.clone()
    for bad in (torch.full((50, D), 0.1), with_nan_row(4)):
        with pytest.raises((DataError, NonFiniteError)):
            sae.fit_normalization(bad)
        assert torch.equal(sae.norm_mean, before[0]) and torch.equal(sae.norm_scale, before[1])


def test_table_covers_every_field():
    """A field added to SAEConfig or to config.json gets its missing-field case."""
    ids = {c.id for c in CASES}
    assert {f"json-config-missing-{name}" for name in FIELDS} <= ids
    assert {f"json-missing-{name}" for name in TOP_FIELDS} <= ids
    assert len(CASES) >= 40
