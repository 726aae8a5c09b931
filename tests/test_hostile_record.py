"""Hostile inputs to recording (issue 14, class 8): folders, file lists, damaged and odd
images, bad layers / keep / batch settings, resuming with changed settings. Every case is
a clear error naming the problem, or a documented behaviour checked here. Plus the
``saeengine record`` command line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import case, hostile_table
from PIL import Image

from saeengine._lock import exclusive_lock
from saeengine.backbones import load_images, record_activations
from saeengine.errors import ConfigError, DataMismatchError, InputError, LockedError, NonFiniteError
from saeengine.store import ActivationStore

_SPEC = importlib.util.spec_from_file_location(
    "record_memory", Path(__file__).resolve().parents[1] / "benchmarks" / "record_memory.py")
record_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(record_memory)
tiny_backbone = record_memory.tiny_backbone

TOKENS = 64  # tiny_backbone: 16 px images -> 8x8 positions at blocks.0 and blocks.1


def png(path: Path, value=None, size=(12, 10), seed=0) -> Path:
    """An RGB PNG: random pixels, or all ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if value is None
              else np.full((size[1], size[0], 3), value, np.uint8))
    Image.fromarray(pixels).save(path)
    return path


def folder(tmp: Path, names=("a.png", "b.png", "c.png")) -> Path:
    for i, name in enumerate(names):
        png(tmp / "imgs" / name, seed=i)
    return tmp / "imgs"


def rec(tmp: Path, images, layers=("blocks.1",), out="out", backbone=None, **kwargs):
    kwargs.setdefault("progress", False)
    return record_activations(backbone or tiny_backbone(), images, list(layers), tmp / out, **kwargs)


def store(tmp: Path, out="out", layer="blocks.1") -> ActivationStore:
    return ActivationStore(tmp / out / layer)


def truncated_jpeg(path: Path) -> Path:
    png(path.with_suffix(".tmp.png"), size=(64, 64))
    Image.open(path.with_suffix(".tmp.png")).save(path, "JPEG")
    path.with_suffix(".tmp.png").unlink()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def rgb_of(image) -> np.ndarray:
    return np.asarray(load_images([image])[0])


# ----- documented behaviours -----------------------------------------------------------------
def check_paths(expected: list[str], tokens_per_image=TOKENS):
    def check(result, tmp):
        s = ActivationStore(next(iter(result.values())))
        assert s.image_paths == expected
        assert s.n_tokens == len(expected) * tokens_per_image
    return check


def subfolders(tmp):
    for name in ("dogs/2.png", "cats/10.png", "cats/9.png", "z.png", "cats/deep/1.png"):
        png(tmp / "imgs" / name)
    return rec(tmp, tmp / "imgs")


def tif_and_more(tmp):
    png(tmp / "x.png")
    for name, fmt in (("a.tif", "TIFF"), ("b.TIFF", "TIFF"), ("c.jpeg", "JPEG"), ("d.webp", "WEBP"), ("e.bmp", "BMP")):
        (tmp / "imgs").mkdir(exist_ok=True)
        Image.open(tmp / "x.png").save(tmp / "imgs" / name, fmt)
    return rec(tmp, tmp / "imgs")


def with_other_files(tmp):
    folder(tmp, ("a.png", "b.png"))
    (tmp / "imgs" / "notes.txt").write_text("x")
    (tmp / "imgs" / "labels.json").write_text("{}")
    (tmp / "imgs" / "sub").mkdir()
    (tmp / "imgs" / "sub" / "readme.txt").write_text("x")
    return rec(tmp, tmp / "imgs")


def file_list(tmp):
    folder(tmp, ("a.png", "b.png"))
    other = png(tmp / "elsewhere" / "c.png")
    (tmp / "list.txt").write_text(f"# my images\nimgs/b.png\n\n  imgs/a.png\n{other}\n")
    return rec(tmp, tmp / "list.txt")


def python_list(tmp):
    paths = [png(tmp / "d" / "x" / "1.png"), png(tmp / "d" / "y" / "2.png")]
    return rec(tmp, [str(paths[1]), paths[0]])


def skip_unreadable(tmp):
    folder(tmp, ("a.png", "c.png"))
    (tmp / "imgs" / "b.png").write_text("not a png")
    return rec(tmp, tmp / "imgs", skip_unreadable=True, batch_size=2)


def check_skipped(result, tmp):
    s = store(tmp)
    assert s.image_paths == ["a.png", "b.png", "c.png"]  # the skipped image keeps its index and path
    assert s.meta.progress["skipped"] == ["b.png"]
    assert s.n_tokens == 2 * TOKENS and set(s.sources(np.arange(s.n_tokens))[0].tolist()) == {0, 2}


def all_unreadable(tmp):
    (tmp / "a.png").write_text("x")
    with pytest.warns(UserWarning, match="skipped"):
        rec(tmp, [tmp / "a.png"], skip_unreadable=True)


def sixteen_bit_pngs(tmp):
    """Two 16-bit grays, 10000 and 40000: scaled to 8 bit (39, 156), not both clipped to 255."""
    for name, value in (("dark.png", 10000), ("light.png", 40000)):
        (tmp / "imgs").mkdir(exist_ok=True)
        Image.fromarray(np.full((10, 12), value, np.uint16)).save(tmp / "imgs" / name)
    assert Image.open(tmp / "imgs" / "dark.png").mode == "I;16"
    return rec(tmp, tmp / "imgs", dtype="float32"), load_images(tmp / "imgs")


def check_sixteen_bit(result, tmp):
    stores, images = result
    assert [np.asarray(im)[0, 0].tolist() for im in images] == [[39] * 3, [156] * 3]
    s = ActivationStore(stores["blocks.1"])
    assert not torch.equal(s.get(np.arange(TOKENS)), s.get(np.arange(TOKENS, 2 * TOKENS)))


def odd_modes(tmp):
    """Each (file, expected RGB of pixel 0) by the documented conversion rule."""
    tmp.mkdir(exist_ok=True)
    made = {}
    Image.fromarray(np.full((4, 4), 51400, np.uint16)).save(tmp / "g16.tif")
    made["g16.tif"] = [200] * 3
    Image.fromarray(np.full((4, 4), 30000, np.int32)).save(tmp / "i32.tif")
    made["i32.tif"] = [117] * 3                                                      # in [0, 65535]: *255/65535
    Image.fromarray(np.full((4, 4), 100, np.int32)).save(tmp / "i8.tif")
    made["i8.tif"] = [100] * 3                                                       # in [0, 255]: kept
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp / "f.tif")
    made["f.tif"] = [128] * 3                                                        # float in [0, 1]: *255
    gray_alpha = np.dstack([np.full((4, 4), 90, np.uint8), np.full((4, 4), 10, np.uint8)])
    Image.fromarray(gray_alpha, "LA").save(tmp / "la.png")
    made["la.png"] = [90] * 3                                                        # alpha dropped
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.save(tmp / "p.png", transparency=0)
    made["p.png"] = [10, 20, 30]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp / "cmyk.jpg")
    made["cmyk.jpg"] = [255, 0, 0]
    return {name: rgb_of(tmp / name)[0, 0].tolist() for name in made}, made


def check_odd_modes(result, tmp):
    got, expected = result
    for name in expected:
        assert np.allclose(got[name], expected[name], atol=2), (name, got[name], expected[name])


def arrays(tmp):
    return [rgb_of(np.full((3, 3, 3), 65535, np.uint16))[0, 0].tolist(),
            rgb_of(np.full((3, 3), 0.25, np.float32))[0, 0].tolist(),
            rgb_of(np.full((3, 3, 1), 7, np.uint8))[0, 0].tolist(),
            rgb_of(np.zeros((3, 3), bool))[0, 0].tolist()]


def keep_missing_kind_then_reuse(tmp):
    folder(tmp)
    with pytest.raises(ConfigError, match="matches none"):
        rec(tmp, tmp / "imgs", keep=("cls",))
    return rec(tmp, tmp / "imgs")  # the failed call left the folder empty: no resume needed


def keep_matches_nothing_in_sequences(tmp):
    backbone = tiny_backbone()
    backbone.fixed_layout = False  # as sequence models: per-sample kinds, checked over the whole run
    return rec(tmp, folder(tmp), keep=("cls",), backbone=backbone)


def resume_with(tmp, **changed):
    folder(tmp)
    settings = dict(layers=("blocks.1",), keep=("patch",), batch_size=2, dtype="float16")
    rec(tmp, tmp / "imgs", **settings)
    if changed.pop("add_image", False):
        png(tmp / "imgs" / "d.png")
    settings.update(changed)
    return rec(tmp, tmp / "imgs", resume=True, **settings)


def renamed(backbone, name):
    backbone.name = name
    return backbone


def resume_complete(tmp):
    rec(tmp, folder(tmp))
    first = store(tmp).content_hash
    rec(tmp, tmp / "imgs", resume=True)
    return first


def interrupted_then_fixed(tmp):
    """An unreadable image stops the recording; the file is repaired; resume ends with the
    store of a clean recording."""
    folder(tmp, [f"{i}.png" for i in range(8)])
    (tmp / "imgs" / "5.png").write_text("damaged")
    with pytest.raises(InputError, match=r"5\.png.*resume=True"):
        rec(tmp, tmp / "imgs", layers=("blocks.0", "blocks.2"), batch_size=2, shard_tokens=200)
    png(tmp / "imgs" / "5.png", seed=5)
    rec(tmp, tmp / "imgs", layers=("blocks.0", "blocks.2"), batch_size=2, shard_tokens=200, resume=True)
    rec(tmp, tmp / "imgs", layers=("blocks.0", "blocks.2"), batch_size=2, shard_tokens=200, out="clean")
    return [(store(tmp, layer=l).content_hash, store(tmp, "clean", l).content_hash) for l in ("blocks.0", "blocks.2")]


def killed_settings_write(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / ".recording.json.tmp-1a2b3c4d").write_text("{")  # what a kill inside atomic_write leaves
    return rec(tmp, folder(tmp))


def locked(tmp):
    folder(tmp)
    with exclusive_lock(tmp / "out", "recording folder"):
        rec(tmp, tmp / "imgs")


def nan_activations(tmp):
    backbone = tiny_backbone()
    with torch.no_grad():
        backbone.model.blocks[0][0].bias.fill_(float("nan"))
    rec(tmp, folder(tmp), backbone=backbone)


CASES = [
    # 1. what is read, and how
    case("folder-recursive-sorted-by-relative-path", subfolders, None,
         check=check_paths(["cats/10.png", "cats/9.png", "cats/deep/1.png", "dogs/2.png", "z.png"])),
    case("folder-tif-tiff-jpeg-webp-bmp-read", tif_and_more, None,
         check=check_paths(["a.tif", "b.TIFF", "c.jpeg", "d.webp", "e.bmp"])),
    case("folder-other-files-skipped-with-warning", with_other_files, None, "skipped 3 files", ".json (1)",
         ".txt (2)", warns=UserWarning, check=check_paths(["a.png", "b.png"])),
    case("folder-empty", lambda t: rec(t, (t / "e").mkdir() or t / "e"), InputError, "holds no images"),
    case("folder-only-other-files", lambda t: (t / "e").mkdir() or (t / "e" / "x.txt").write_text("")
         or rec(t, t / "e"), InputError, "no images", "skipped 1 other files: .txt (1)"),
    case("folder-missing", lambda t: rec(t, t / "nowhere"), InputError, "nowhere does not exist", "folder"),
    case("file-list-read-as-written", file_list, None,
         check=lambda r, t: check_paths(["imgs/b.png", "imgs/a.png", (t / "elsewhere" / "c.png").as_posix()])(r, t)),
    case("file-list-names-missing-file", lambda t: folder(t) and (t / "l.txt").write_text("imgs/a.png\nimgs/zz.png")
         and rec(t, t / "l.txt"), InputError, "l.txt, line 2", "imgs/zz.png", "does not exist"),
    case("file-list-empty", lambda t: (t / "l.txt").write_text("# nothing\n\n") and rec(t, t / "l.txt"),
         InputError, "lists no images"),
    case("file-list-binary", lambda t: (t / "l.dat").write_bytes(b"\xff\xfe\x00\x81") and rec(t, t / "l.dat"),
         InputError, "l.dat", "not a text file"),
    case("one-image-file-instead-of-folder", lambda t: rec(t, png(t / "a.png")), InputError, "one image file",
         "folder"),
    case("python-list-of-paths-relative-to-common-folder", python_list, None,
         check=check_paths(["y/2.png", "x/1.png"])),
    case("python-list-missing-path", lambda t: rec(t, [png(t / "a.png"), t / "b.png"]), InputError, "image 1",
         "b.png does not exist"),
    case("empty-list", lambda t: rec(t, []), InputError, "nothing to record", "empty"),
    case("one-array-not-a-list", lambda t: rec(t, np.zeros((4, 8, 8, 3), np.uint8)), InputError, "one ndarray",
         "list(array)"),
    case("truncated-jpeg-names-file", lambda t: rec(t, [truncated_jpeg(t / "broken.jpg")]), InputError,
         "broken.jpg", "cannot read the image", "truncated", "skip_unreadable=True"),
    case("non-image-with-image-suffix", lambda t: (t / "fake.png").write_text("hello") and rec(t, [t / "fake.png"]),
         InputError, "fake.png", "cannot read the image"),
    case("skip-unreadable-keeps-index-and-path", skip_unreadable, None, "skipped", "b.png", warns=UserWarning,
         check=check_skipped),
    case("skip-unreadable-all-unreadable", all_unreadable, InputError, "no image could be read", "all 1"),
    case("png-16-bit-scaled-not-clipped", sixteen_bit_pngs, None, check=check_sixteen_bit),
    case("modes-I16-I-F-LA-P-CMYK-converted", odd_modes, None, check=check_odd_modes),
    case("arrays-uint16-float-1channel-bool", arrays, None,
         check=lambda r, t: r == [[255] * 3, [64] * 3, [7] * 3, [0] * 3] or pytest.fail(str(r))),
    case("list-of-chw-tensors", lambda t: rec(t, [torch.zeros(3, 8, 8)]), InputError, "image 0 is a Tensor",
         "permute(1, 2, 0)"),
    case("images-not-a-collection", lambda t: rec(t, 5), InputError, "one int", "folder"),
    case("mixed-list-of-paths-and-arrays", lambda t: rec(t, [str(png(t / "a.png")), np.zeros((8, 8, 3), np.uint8)]),
         None, check=lambda r, t: store(t).n_tokens == 2 * TOKENS and store(t).image_paths == []
         or pytest.fail("not recorded as two in-memory images")),
    case("array-bad-shape", lambda t: rec(t, [np.zeros((4, 4, 2, 2), np.uint8)]), InputError, "image 0",
         "shape is (4, 4, 2, 2)", "HxW"),
    case("array-nan", lambda t: rec(t, [np.full((4, 4), np.nan, np.float32)]), InputError, "image 0", "NaN"),
    # 3. settings
    case("layer-named-twice", lambda t: rec(t, folder(t), layers=("blocks.1", "blocks.1")), ConfigError,
         "'blocks.1' is named twice", "name each layer once"),
    case("layer-named-twice-as-negative-index", lambda t: rec(t, folder(t), layers=("blocks.2", "blocks.-1")),
         ConfigError, "named twice", "'blocks.2' and 'blocks.-1'"),
    case("layer-unknown", lambda t: rec(t, folder(t), layers=("blocks.7",)), ConfigError,
         "blocks.0 .. blocks.2", "got 'blocks.7'"),
    case("layer-not-a-string", lambda t: rec(t, folder(t), layers=(1,)), ConfigError, "blocks.0 .. blocks.2", "got 1"),
    case("layers-empty", lambda t: rec(t, folder(t), layers=()), ConfigError, "at least one layer",
         "blocks.0 .. blocks.2"),
    case("keep-unknown-kind", lambda t: rec(t, folder(t), keep=("patches",)), ConfigError,
         "unknown token kinds ['patches']", "['cls', 'register', 'patch']"),
    case("keep-empty", lambda t: rec(t, folder(t), keep=()), ConfigError, "at least one token kind", "patch"),
    case("keep-kind-twice", lambda t: rec(t, folder(t), keep=("patch", "patch")), ConfigError, "twice"),
    case("keep-kind-the-model-lacks", lambda t: rec(t, folder(t), keep=("register",)), ConfigError,
         "keep=['register'] matches none", "kinds ['patch']"),
    case("keep-kind-the-model-lacks-leaves-folder-reusable", keep_missing_kind_then_reuse, None,
         check=lambda r, t: store(t).n_tokens == 3 * TOKENS or pytest.fail("not recorded")),
    case("keep-matches-no-token-of-any-sequence", keep_matches_nothing_in_sequences, ConfigError,
         "matched no token of the 3 inputs", "['patch']"),
    case("batch-size-zero", lambda t: rec(t, folder(t), batch_size=0), ConfigError, "batch_size", ">= 1", "got 0"),
    case("batch-size-negative", lambda t: rec(t, folder(t), batch_size=-4), ConfigError, "batch_size", ">= 1"),
    case("batch-size-float", lambda t: rec(t, folder(t), batch_size=2.5), ConfigError, "batch_size", "integer"),
    case("batch-size-bool", lambda t: rec(t, folder(t), batch_size=True), ConfigError, "batch_size", "True"),
    case("shard-tokens-zero", lambda t: rec(t, folder(t), shard_tokens=0), ConfigError, "shard_tokens", ">= 1"),
    case("dtype-unknown", lambda t: rec(t, folder(t), dtype="float64"), ConfigError, "float64", "'float16'"),
    case("out-dir-not-empty", lambda t: (t / "out").mkdir() or (t / "out" / "x").write_text("")
         or rec(t, folder(t)), ConfigError, "not empty", "resume=True", "new folder"),
    case("out-dir-holding-only-a-killed-settings-write-is-empty", killed_settings_write, None,
         check=check_paths(["a.png", "b.png", "c.png"])),
    case("out-dir-is-a-file", lambda t: (t / "out").write_text("") or rec(t, folder(t)), ConfigError, "is a file"),
    case("resume-in-a-foreign-folder", lambda t: (t / "out").mkdir() or (t / "out" / "x").write_text("")
         or rec(t, folder(t), resume=True), ConfigError, "no recording.json", "new folder"),
    case("second-recorder-is-locked-out", locked, LockedError, "in use by pid"),
    case("nan-activations-refused", nan_activations, NonFiniteError, "nan"),
    # 2. resuming
    case("resume-changed-batch-size", lambda t: resume_with(t, batch_size=3), DataMismatchError,
         "batch_size: 2 when recorded, 3 now", "same settings"),
    case("resume-changed-layers", lambda t: resume_with(t, layers=("blocks.0",)), DataMismatchError,
         "layers: ['blocks.1'] when recorded, ['blocks.0'] now"),
    case("resume-changed-keep", lambda t: resume_with(t, keep=("patch", "cls")), DataMismatchError, "keep"),
    case("resume-changed-dtype", lambda t: resume_with(t, dtype="float32"), DataMismatchError,
         "dtype: 'float16' when recorded, 'float32' now"),
    case("resume-changed-image-list", lambda t: resume_with(t, add_image=True), DataMismatchError,
         "images: 3", "4 ("),
    case("resume-changed-weights", lambda t: resume_with(t, backbone=tiny_backbone(seed=1)), DataMismatchError,
         "weights: other parameters"),
    case("resume-changed-backbone", lambda t: resume_with(t, backbone=renamed(tiny_backbone(), "other-net")),
         DataMismatchError, "backbone: 'tiny-conv' when recorded, 'other-net' now"),
    case("resume-changed-image-size", lambda t: resume_with(t, backbone=tiny_backbone(image_size=32)),
         DataMismatchError, "image_size: 16 when recorded, 32 now"),
    case("resume-of-a-complete-recording-changes-nothing", resume_complete, None,
         check=lambda r, t: store(t).content_hash == r or pytest.fail("content changed")),
    case("resume-in-an-empty-folder-starts-one", lambda t: rec(t, folder(t), resume=True), None,
         check=check_paths(["a.png", "b.png", "c.png"])),
    case("resume-after-an-unreadable-image-was-repaired", interrupted_then_fixed, None,
         check=lambda r, t: all(a == b for a, b in r) or pytest.fail(str(r))),
]

test_hostile = hostile_table(CASES)


# ----- the command line ----------------------------------------------------------------------
def cli(argv, capsys):
    from saeengine.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # usage errors exit as argparse's do
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_records_a_folder_and_resumes(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the default backbone needs efficientnet_lite_pytorch")
    folder(tmp_path, ("cls1/a.png", "cls2/b.png"))
    argv = ["record", str(tmp_path / "imgs"), "--layers", "blocks.2,blocks.-1", "--out-dir", str(tmp_path / "acts"),
            "--image-size", "32", "--batch-size", "1", "--no-progress"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    s = ActivationStore(tmp_path / "acts" / "blocks.15")
    assert s.image_paths == ["cls1/a.png", "cls2/b.png"] and s.n_tokens == 2 * 1  # 32 px -> 1x1 at the last block
    assert f"blocks.-1: {s.n_tokens} tokens of 2 images" in out and "recorded 2 images" in out
    assert json.loads((tmp_path / "acts" / "recording.json").read_text())["layers"] == ["blocks.2", "blocks.15"]
    code, _, err = cli(argv, capsys)  # again without --resume: refused, nothing touched
    assert code == 1 and "--resume" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(argv + ["--resume"], capsys)
    assert code == 0 and ActivationStore(tmp_path / "acts" / "blocks.15").content_hash == s.content_hash


@pytest.mark.parametrize("extra,code,phrase", [
    (["--backbone", "transformers"], 2, "needs --model"),
    (["--backbone", "efficientnet-lite0", "--model", "x"], 2, "takes no --model"),
    (["--weights", "/nonexistent/w.pth"], 1, "/nonexistent/w.pth: no such file"),
    (["--batch-size", "0"], 2, "--batch-size must be >= 1"),
    (["--device", "nonsense"], 1, "--device nonsense"),
])
def test_cli_usage_errors_are_one_line(tmp_path, capsys, extra, code, phrase):
    folder(tmp_path)
    got, _, err = cli(["record", str(tmp_path / "imgs"), "--layers", "blocks.1", "--out-dir", str(tmp_path / "o"),
                       *extra], capsys)
    assert got == code and phrase in err and len(err.strip().splitlines()) == 1, err


def test_out_of_memory_while_decoding_is_not_an_unreadable_image(tmp_path, monkeypatch):
    """--skip-unreadable must not turn a MemoryError into a warning about the file."""
    from PIL import Image

    from saeengine.backbones import images as images_module

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)

    def no_memory(image):
        raise MemoryError

    monkeypatch.setattr(images_module, "to_rgb", no_memory)
    with pytest.raises(MemoryError):
        images_module.decode_file(path)
