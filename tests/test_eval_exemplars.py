"""Streaming exemplars (saeengine.eval.exemplars) against a brute-force top-k over a dense
[tokens, F] code matrix built with plain numpy loops, for the three rules; batch-split and
resume invariance; memory bounds; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import requires_gpu
from saeengine.errors import ConfigError, DataMismatchError, InputError
from saeengine.eval.batch import TokenBatch
from saeengine.eval.exemplars import Exemplars, heatmap

F = 13  # not a multiple of anything useful
NEVER = (11, 12)  # latents that never fire
WIDTH = 3


def make_images(n_images: int, seed: int, cls_share: float = 0.6):
    """A list of images in store order, each a dict of numpy arrays: values/indices [n, WIDTH],
    position [n], is_cls [n]; ids drawn at random (store order is not id order). Values are
    multiples of 1/4 so that sums are exact and ties are common."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n_images)[:n_images]
    images = []
    for img in ids:
        has_cls = rng.random() < cls_share
        n_patch = int(rng.integers(0 if has_cls else 1, 7))
        n = n_patch + has_cls
        values = np.zeros((n, WIDTH), np.float32)
        indices = rng.integers(0, F, size=(n, WIDTH))  # padding slots: value 0, any id (repeats too)
        for t in range(n):
            fire = int(rng.integers(0, WIDTH + 1))
            indices[t, :fire] = rng.choice([j for j in range(F) if j not in NEVER], size=fire, replace=False)
            values[t, :fire] = rng.integers(1, 7, size=fire) / 4
        position = np.arange(n) if has_cls else np.arange(n) + int(rng.integers(0, 3))
        is_cls = np.zeros(n, bool)
        is_cls[:has_cls] = True
        images.append(dict(image=int(img), values=values, indices=indices.astype(np.int64), position=position,
                           is_cls=is_cls))
    return images


def to_batch(images, device="cpu") -> TokenBatch:
    cat = {k: np.concatenate([im[k] if k != "image" else np.full(len(im["position"]), im["image"])
                              for im in images]) for k in ("values", "indices", "position", "is_cls", "image")}
    n = cat["values"].shape[0]
    t = {k: torch.as_tensor(v, device=device) for k, v in cat.items()}
    x = torch.zeros(n, 2, device=device)
    return TokenBatch(x=x, x_hat=x, values=t["values"], indices=t["indices"], image=t["image"].long(),
                      position=t["position"].long(), is_cls=t["is_cls"])


def stream(images, cuts, device="cpu"):
    """Batches of whole images, cut before the image numbers in ``cuts``."""
    bounds = [0, *sorted(cuts), len(images)]
    return [to_batch(images[a:b], device) for a, b in zip(bounds, bounds[1:]) if b > a]


def run(batches, top_k, rules=("patch", "image", "cls")):
    acc = Exemplars(F, top_k=top_k, rules=rules)
    for b in batches:
        acc.update(b)
    return acc.result()


def brute_force(images, top_k):
    """The oracle: a dense [tokens, F] matrix, per-image loops, a full sort per latent."""
    n = sum(len(im["position"]) for im in images)
    dense = np.zeros((n, F), np.float64)
    owner, pos, cls = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
    row = 0
    for im in images:
        for t in range(len(im["position"])):
            for v, j in zip(im["values"][t], im["indices"][t]):
                if v > 0:
                    dense[row, j] = v
            owner[row], pos[row], cls[row] = im["image"], im["position"][t], im["is_cls"][t]
            row += 1
    candidates = {rule: [[] for _ in range(F)] for rule in ("patch", "image", "cls")}
    for img in np.unique(owner):
        patches = np.flatnonzero((owner == img) & ~cls)
        cls_rows = np.flatnonzero((owner == img) & cls)
        for j in range(F):
            if patches.size:
                col = dense[patches, j]
                if col.max() > 0:
                    best = min(pos[patches[i]] for i in range(patches.size) if col[i] == col.max())
                    candidates["patch"][j].append((np.float32(col.max()), img, best))
                    candidates["image"][j].append((np.float32(col.sum()), img, -1))
            if cls_rows.size and dense[cls_rows[0], j] > 0:
                candidates["cls"][j].append((np.float32(dense[cls_rows[0], j]), img, pos[cls_rows[0]]))
    out = {}
    for rule, per_latent in candidates.items():
        scores = np.full((F, top_k), -np.inf, np.float32)
        ids = np.full((F, top_k), -1, np.int64)
        where = np.full((F, top_k), -1, np.int64)
        for j, cands in enumerate(per_latent):
            for c, (s, img, p) in enumerate(sorted(cands, key=lambda c: (-c[0], c[1]))[:top_k]):
                scores[j, c], ids[j, c], where[j, c] = s, img, p
        out[rule] = {"scores": scores, "images": ids, "positions": where}
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for rule in a:
        for f in ("scores", "images", "positions"):
            x, y = torch.as_tensor(a[rule][f]), torch.as_tensor(b[rule][f])
            assert x.dtype == y.dtype and torch.equal(x, y), (rule, f)


@pytest.mark.parametrize("top_k", [1, 4, 60])  # 60 > the number of images
def test_matches_brute_force(top_k):
    images = make_images(31, seed=top_k)
    got = run(stream(images, cuts=[5, 6, 17, 29]), top_k)
    want = brute_force(images, top_k)
    assert_same(got, want)
    for rule in got:
        ids = got[rule]["images"]
        for j in range(F):
            real = ids[j][ids[j] >= 0]
            assert real.unique().numel() == real.numel(), (rule, j)  # unique images per row
        assert (got[rule]["images"][list(NEVER)] == -1).all()
    # The stream has ties (scores are multiples of 1/4) and latents beyond the top_k of images.
    s = got["patch"]["scores"]
    assert ((s[:, 1:] == s[:, :-1]) & torch.isfinite(s[:, 1:])).any() or top_k == 1
    assert (got["patch"]["images"] == -1).any() if top_k == 60 else (got["patch"]["images"][:F - 2] >= 0).all()


def test_split_points_do_not_change_the_result():
    images = make_images(40, seed=7)
    one = run(stream(images, []), 6)
    each = run(stream(images, range(1, len(images))), 6)
    rng = np.random.default_rng(3)
    some = run(stream(images, rng.choice(np.arange(1, len(images)), 9, replace=False)), 6)
    assert_same(one, each)
    assert_same(one, some)


def test_resume_from_saved_state_is_bit_identical(tmp_path):
    images = make_images(30, seed=11)
    batches = stream(images, [4, 9, 10, 22])
    want = run(batches, 5)
    first = Exemplars(F, top_k=5)
    for b in batches[:3]:
        first.update(b)
    save_file(first.state_dict(), str(tmp_path / "state.safetensors"))
    second = Exemplars(F, top_k=5)
    second.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    for b in batches[3:]:
        second.update(b)
    assert_same(second.result(), want)
    assert_same(run(batches[:3], 5), first.result())  # saving did not disturb the saved accumulator


def test_repeated_image_is_listed_once():
    images = make_images(12, seed=5)
    batch = to_batch(images)
    once = run([batch], 50)
    twice = run([batch, batch], 50)
    assert_same(once, twice)


def test_rule_without_cls_tokens_is_all_pad():
    images = make_images(15, seed=2, cls_share=0.0)
    got = run(stream(images, [3, 8]), 4)
    assert (got["cls"]["images"] == -1).all() and torch.isinf(got["cls"]["scores"]).all()
    assert (got["patch"]["images"] >= 0).any()
    assert_same(got, brute_force(images, 4))


def test_rules_subset_and_exemplars_accessor():
    images = make_images(10, seed=4)
    acc = Exemplars(F, top_k=3, rules=("image",))
    acc.update(to_batch(images))
    assert list(acc.result()) == ["image"]
    assert_same({"image": acc.exemplars("image")}, {"image": brute_force(images, 3)["image"]})
    with pytest.raises(ConfigError, match="patch"):
        acc.exemplars("patch")


def test_state_size_does_not_grow_with_tokens():
    def state_bytes(n_images):
        acc = Exemplars(F, top_k=7)
        for b in stream(make_images(n_images, seed=n_images), range(5, n_images, 5)):
            acc.update(b)
        return sum(t.numel() * t.element_size() for t in acc.state_dict().values())

    small, large = state_bytes(10), state_bytes(100)
    assert small == large == 3 * F * 7 * (4 + 8 + 8)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_update_never_builds_a_tokens_by_latents_tensor():
    d_sae, k, n, w = 2000, 3, 1500, 2
    rng = np.random.default_rng(0)
    image = np.repeat(np.arange(n // 10), 10)
    batch = TokenBatch(x=torch.zeros(n, 1), x_hat=torch.zeros(n, 1),
                       values=torch.as_tensor(rng.integers(1, 9, (n, w)) / 8, dtype=torch.float32),
                       indices=torch.as_tensor(rng.integers(0, d_sae, (n, w))),
                       image=torch.as_tensor(image), position=torch.as_tensor(np.tile(np.arange(10), n // 10)),
                       is_cls=torch.as_tensor(np.tile(np.arange(10) == 0, n // 10)))
    acc = Exemplars(d_sae, top_k=k)
    acc.update(batch)  # first update moves the tables; measure the steady state
    with _LargestTensor() as probe:
        acc.update(batch)
    bound = 2 * d_sae * 2 * k + 4 * n * w  # the merged [F, 2K] rows and the batch's pairs
    assert 0 < probe.largest <= bound < n * d_sae / 50


def test_bad_latent_id_names_id_and_d_sae():
    images = make_images(3, seed=1)
    batch = to_batch(images)
    batch.values[0, 0] = 1.0  # a firing slot
    batch.indices[0, 0] = F + 4
    with pytest.raises(InputError, match=rf"latent id {F + 4}.*d_sae={F}"):
        Exemplars(F).update(batch)
    batch.indices[0, 0] = -2
    with pytest.raises(InputError, match="latent id -2"):
        Exemplars(F).update(batch)



def test_padding_slots_may_hold_any_id():
    images = make_images(3, seed=1)
    batch = to_batch(images)
    batch.values[0, -1] = 0.0
    batch.indices[0, -1] = F + 99  # value 0: a padding slot, not a latent
    reference = to_batch(images)
    reference.values[0, -1] = 0.0
    assert_same(run([batch], 4), run([reference], 4))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(top_k=0), "top_k=0"), (dict(top_k=2.5), "top_k=2.5"),
    (dict(rules=("patch", "max")), "unknown: 'max'"), (dict(rules=()), "subset"),
    (dict(d_sae=0), "d_sae=0")])
def test_bad_config_raises(kwargs, needle):
    kwargs = {"d_sae": F, **kwargs}
    with pytest.raises(ConfigError, match=needle) as err:
        Exemplars(**kwargs)
    if "rules" in kwargs:
        assert "('patch', 'image', 'cls')" in str(err.value)


def test_load_state_from_other_shape_or_rules_raises():
    state = Exemplars(F, top_k=4).state_dict()
    with pytest.raises(DataMismatchError, match="top_k"):
        Exemplars(F, top_k=5).load_state_dict(state)
    with pytest.raises(DataMismatchError, match="rules"):
        Exemplars(F, top_k=4, rules=("patch",)).load_state_dict(state)


def test_heatmap_matches_loop():
    rng = np.random.default_rng(9)
    n, latent = 12, 3
    values = (rng.integers(0, 5, (n, WIDTH)) / 2).astype(np.float32)
    indices = rng.integers(0, 5, (n, WIDTH))
    positions = rng.permutation(16)[:n]
    want = np.zeros(16, np.float32)
    for t in range(n):
        for v, j in zip(values[t], indices[t]):
            if j == latent and v > 0:
                want[positions[t]] = max(want[positions[t]], v)
    got = heatmap(values, indices, positions, latent, 16)
    assert got.dtype == torch.float32 and got.shape == (16,)
    assert torch.equal(got, torch.from_numpy(want)) and want.any()
    outside = positions.copy()
    outside[0] = 15
    with pytest.raises(InputError, match="position 15.*n_positions=15"):
        heatmap(values, indices, outside, latent, 15)


@requires_gpu
def test_gpu_matches_cpu():
    images = make_images(40, seed=21)
    cuts = [3, 10, 11, 30]
    assert_same(run(stream(images, cuts, "cuda"), 6), run(stream(images, cuts), 6))
