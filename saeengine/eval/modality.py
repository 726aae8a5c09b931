"""Shared vision-language latents: per-latent firing rates on image and text tokens, the
modality score, the shared latents, and the grounding of (image, caption) pairs by the
overlap of their active latent sets. Definitions [P] (ours; the source paper's exact ones
are unknown) with formulas in docs/modality.md; in short, over one pass of N tokens, each
an image token or a text token:

- firing: latent j fires on a token when its code value is > 0.
- p_img[j] = #{image tokens where j fires} / #image tokens; p_txt[j] likewise on text.
- modality score m[j] = p_img[j] / (p_img[j] + p_txt[j]): 1 = image-only, 0 = text-only.
  Rates, not counts, so the score does not lean towards the modality with more tokens.
  A latent that never fires (p_img = p_txt = 0) has no score: NaN (null in JSON).
- live latents: those that fire at least once (on either kind).
- shared: low <= m[j] <= high and p_img[j] >= min_rate and p_txt[j] >= min_rate (defaults
  0.1, 0.9, 1e-4). Every live latent is exactly one of "image" (m > high), "text"
  (m < low), "shared", or "rare_mixed" (in the band, but a rate below min_rate).
- shared fraction = #shared / #live (NaN when no latent is live).

Grounding, for P pairs (each pair's image tokens and its caption tokens):

- active sets: A_i = the latents firing on at least max(1, ceil(min_share * n)) of pair
  i's n image tokens (min_share = 0: the union over its tokens); B_i likewise over its
  caption tokens.
- Jaccard J(A, B) = |A & B| / |A | B| (0 when both are empty).
- matched scores J(A_i, B_i); mismatched scores J(A_i, B_pi(i)), pi a derangement (no
  fixed point) drawn by Sattolo's algorithm from ``seed``: one mismatched caption per
  image, deterministic.
- AUROC = P(matched > mismatched) + 1/2 P(equal), from saeengine.eval.ood.auroc with the
  matched scores as the positive class (0.5 = the captions carry no pair information).

Both accumulators stream: ``add`` one batch of codes at a time; memory is O(F) for the
rates and O(distinct (pair, side, latent) firings) for the sets. Codes are SparseCode /
DenseCode objects or (values, indices) pairs from saeengine.eval.batch.code_pairs.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from ..errors import InputError
from ._args import count, is_int
from .batch import code_pairs
from .latent_stats import check_code_pairs

SHARED_LOW, SHARED_HIGH, MIN_RATE = 0.1, 0.9, 1e-4
CATEGORIES = ("image", "text", "shared", "rare_mixed")


# ----- inputs ------------------------------------------------------------------------------
def as_pairs(code, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A SparseCode / DenseCode, or values [N, w] with indices [N, w] -> CPU (values
    float32 [N, w], indices int64 [N, w])."""
    if indices is None:
        if isinstance(code, torch.Tensor):
            raise InputError("a bare tensor is ambiguous: pass a SparseCode / DenseCode, or values with indices "
                             "(saeengine.eval.batch.code_pairs makes both); wrap dense activations [N, F] as "
                             "saeengine.architectures.dense.DenseCode(values)")
        values, indices = code_pairs(code)
    else:
        values = code
    return values.detach().float().cpu(), indices.detach().cpu()


def image_mask(kinds, n: int) -> torch.Tensor:
    """Token kinds -> bool [n] (True = image token). ``kinds``: a bool array (True = image)
    or a sequence of the strings "image" / "text" (drop pad and other tokens first)."""
    if isinstance(kinds, (torch.Tensor, np.ndarray)) and kinds.dtype in (torch.bool, np.bool_):
        mask = torch.as_tensor(np.asarray(kinds.cpu() if isinstance(kinds, torch.Tensor) else kinds))
    else:
        kinds = list(kinds)
        other = sorted({str(k) for k in kinds} - {"image", "text"})
        if other:
            raise InputError(f"token kinds must be 'image' or 'text', got {other}; drop the other tokens (pad, "
                             "...) before counting, or pass a bool mask (True = image token)")
        mask = torch.tensor([k == "image" for k in kinds], dtype=torch.bool)
    if mask.dim() != 1 or mask.shape[0] != n:
        raise InputError(f"kinds must hold one entry per token: {n} tokens, got shape {tuple(mask.shape)}")
    return mask


def _checked(code, indices, d_sae: int, kinds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = as_pairs(code, indices)
    check_code_pairs(values, indices, d_sae)
    return values, indices, image_mask(kinds, values.shape[0])


def _bands(low: float, high: float, min_rate: float) -> None:
    for name, value in (("low", low), ("high", high), ("min_rate", min_rate)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InputError(f"{name}={value!r} must be a finite number")
    if not 0 <= low <= high <= 1:
        raise InputError(f"the shared band needs 0 <= low <= high <= 1, got low={low}, high={high} "
                         f"(defaults {SHARED_LOW}, {SHARED_HIGH})")
    if min_rate < 0:
        raise InputError(f"min_rate={min_rate} must be >= 0 (default {MIN_RATE})")


# ----- firing rates and the modality score -------------------------------------------------
class ModalityCounts:
    """Streaming firing counts per latent on image and on text tokens.

    d_sae: number of latents F. ``add(code, indices=None, *, kinds)`` takes one batch of N
    tokens (a code, or values/indices [N, w]) and their kinds [N]; ``result()`` returns
    the rates, scores and categories (see the module docstring).
    """

    def __init__(self, d_sae: int) -> None:
        self.d_sae = count("d_sae", d_sae)
        self.n_image = 0
        self.n_text = 0
        self.count_image = torch.zeros(self.d_sae, dtype=torch.int64)
        self.count_text = torch.zeros(self.d_sae, dtype=torch.int64)

    @torch.no_grad()
    def add(self, code, indices=None, *, kinds) -> None:
        values, indices, image = _checked(code, indices, self.d_sae, kinds)
        fire = values > 0
        img_rows = image[:, None].expand_as(fire)
        # each latent appears at most once per token row (checked), so a scatter of ones counts tokens
        self.count_image += torch.bincount(indices[fire & img_rows], minlength=self.d_sae)
        self.count_text += torch.bincount(indices[fire & ~img_rows], minlength=self.d_sae)
        self.n_image += int(image.sum())
        self.n_text += int((~image).sum())

    def result(self, *, low: float = SHARED_LOW, high: float = SHARED_HIGH, min_rate: float = MIN_RATE) -> dict:
        """{"n_image_tokens", "n_text_tokens", "d_sae", "count_image", "count_text" [F] int64,
        "p_img", "p_txt", "score" [F] float64 numpy (score NaN for latents that never fire),
        "category" [F] str ("dead" for those), "is_shared" [F] bool, the count of latents per
        category ("image", "text", "shared", "rare_mixed"; "live", "dead"), "thresholds",
        "shared_fraction" (shared / live), "shared_fraction_of_all" (shared / d_sae)}."""
        _bands(low, high, min_rate)
        for kind, n in (("image", self.n_image), ("text", self.n_text)):
            if n == 0:
                raise InputError(f"the pass held no {kind} tokens, so the {kind} firing rates are undefined; "
                                 f"encode tokens of both kinds (image tokens and caption tokens)")
        c_img, c_txt = self.count_image.numpy(), self.count_text.numpy()
        p_img, p_txt = c_img / self.n_image, c_txt / self.n_text
        score = modality_score(p_img, p_txt)
        category = categorize(p_img, p_txt, low=low, high=high, min_rate=min_rate)
        live = category != "dead"
        summary = {name: int((category == name).sum()) for name in CATEGORIES}
        n_live = int(live.sum())
        return {"n_image_tokens": self.n_image, "n_text_tokens": self.n_text, "d_sae": self.d_sae,
                "count_image": c_img, "count_text": c_txt, "p_img": p_img, "p_txt": p_txt, "score": score,
                "category": category, "is_shared": category == "shared",
                "thresholds": {"low": low, "high": high, "min_rate": min_rate},
                "live": n_live, "dead": self.d_sae - n_live, **summary,
                "shared_fraction": summary["shared"] / n_live if n_live else math.nan,
                "shared_fraction_of_all": summary["shared"] / self.d_sae}


def modality_score(p_img, p_txt) -> np.ndarray:
    """m = p_img / (p_img + p_txt) per latent ([F] float64); NaN where both rates are 0."""
    p_img, p_txt = np.asarray(p_img, dtype=np.float64), np.asarray(p_txt, dtype=np.float64)
    total = p_img + p_txt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, p_img / np.where(total > 0, total, 1.0), np.nan)


def categorize(p_img, p_txt, *, low: float = SHARED_LOW, high: float = SHARED_HIGH,
               min_rate: float = MIN_RATE) -> np.ndarray:
    """[F] str: "dead" (never fires), "image" (m > high), "text" (m < low), "shared" (low
    <= m <= high, both rates >= min_rate) or "rare_mixed" (in the band, a rate below)."""
    _bands(low, high, min_rate)
    p_img, p_txt = np.asarray(p_img, dtype=np.float64), np.asarray(p_txt, dtype=np.float64)
    m = modality_score(p_img, p_txt)
    out = np.full(m.shape, "dead", dtype=object)
    live = ~np.isnan(m)
    band = live & (m >= low) & (m <= high)
    out[live & (m > high)] = "image"
    out[live & (m < low)] = "text"
    frequent = (p_img >= min_rate) & (p_txt >= min_rate)
    out[band & frequent] = "shared"
    out[band & ~frequent] = "rare_mixed"
    return out.astype(str)


def modality_stats(code, indices=None, *, kinds, d_sae: int | None = None, **thresholds) -> dict:
    """One-shot ModalityCounts over one batch of codes (d_sae: the code's width by default)."""
    if d_sae is None:
        d_sae = _width(code)
    counts = ModalityCounts(d_sae)
    counts.add(code, indices, kinds=kinds)
    return counts.result(**thresholds)


def _width(code) -> int:
    """The number of latents a code shows: a DenseCode's width; a SparseCode does not tell."""
    from ..architectures.dense import DenseCode

    if isinstance(code, DenseCode):
        return int(code.values.shape[1])
    raise InputError("pass d_sae= (the SAE's number of latents): a sparse code or values/indices do not tell it")


# ----- pair grounding ----------------------------------------------------------------------
class PairSets:
    """Streaming active latent sets per (pair, side): side 0 = the pair's image tokens,
    side 1 = its caption tokens.

    ``add(code, indices=None, *, pairs, kinds)``: one batch of N tokens with their pair
    index [N] (int >= 0) and kinds [N] ("image" / "text", or a bool mask True = image;
    the text tokens given are the caption's). A pair's tokens may be spread over batches.
    """

    _COMPACT_EVERY = 64  # merge the per-batch (key, count) lists this often: memory stays O(distinct keys)

    def __init__(self, d_sae: int) -> None:
        self.d_sae = count("d_sae", d_sae)
        self._keys: list[torch.Tensor] = []      # (pair * 2 + side) * F + latent, unique per entry
        self._counts: list[torch.Tensor] = []    # firing tokens per key
        self._token_keys: list[torch.Tensor] = []  # pair * 2 + side
        self._token_counts: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, code, indices=None, *, pairs, kinds) -> None:
        values, indices, image = _checked(code, indices, self.d_sae, kinds)
        pairs = torch.as_tensor(np.asarray(pairs.cpu() if isinstance(pairs, torch.Tensor) else pairs))
        if pairs.shape != (values.shape[0],) or (pairs.numel() and (pairs.dtype.is_floating_point or
                                                                     pairs.dtype == torch.bool)):
            raise InputError(f"pairs must be an int array with one pair index per token ({values.shape[0]}), got "
                             f"shape {tuple(pairs.shape)} {pairs.dtype}")
        pairs = pairs.long()
        if pairs.numel() and int(pairs.min()) < 0:
            raise InputError(f"pair indices must be >= 0, got {int(pairs.min())}")
        side_of_token = pairs * 2 + (~image).long()
        fire = values > 0
        keys = side_of_token[:, None].expand_as(indices)[fire] * self.d_sae + indices[fire]
        self._append(self._keys, self._counts, keys)
        self._append(self._token_keys, self._token_counts, side_of_token)

    def _append(self, keys_list: list, counts_list: list, keys: torch.Tensor) -> None:
        unique, counts = keys.unique(return_counts=True)
        keys_list.append(unique)
        counts_list.append(counts)
        if len(keys_list) >= self._COMPACT_EVERY:
            merged = _merge(keys_list, counts_list)
            keys_list[:], counts_list[:] = [merged[0]], [merged[1]]

    def sets(self, *, min_share: float = 0.0) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(n_pairs, image keys, caption keys): the active sets as sorted int64 keys
        pair * F + latent. InputError when a pair index in 0..max has no image token or
        no caption token."""
        if not (isinstance(min_share, (int, float)) and not isinstance(min_share, bool) and 0 <= min_share <= 1):
            raise InputError(f"min_share={min_share!r} must lie in [0, 1] (0: a latent firing on any of the "
                             "pair's tokens is active)")
        token_keys, token_counts = _merge(self._token_keys, self._token_counts)
        if token_keys.numel() == 0:
            raise InputError("no tokens were added; add each pair's image and caption tokens first")
        n_pairs = int(token_keys.max()) // 2 + 1
        n_tokens = torch.zeros(n_pairs * 2, dtype=torch.int64)
        n_tokens[token_keys] = token_counts
        missing = (n_tokens.view(n_pairs, 2) == 0).nonzero()
        if missing.numel():
            pair, side = (int(v) for v in missing[0])
            raise InputError(f"pair {pair} has no {('image', 'caption')[side]} tokens ({missing.shape[0]} "
                             f"(pair, side) slots of {n_pairs} pairs are empty); every pair index 0..{n_pairs - 1} "
                             "needs image tokens and caption tokens")
        keys, counts = _merge(self._keys, self._counts)
        slot = keys // self.d_sae
        needed = torch.clamp(torch.ceil(min_share * n_tokens.double()).long(), min=1)
        active = counts >= needed[slot]
        keys, slot = keys[active], slot[active]
        latent = keys % self.d_sae
        pair = slot // 2
        image_keys = pair[slot % 2 == 0] * self.d_sae + latent[slot % 2 == 0]
        caption_keys = pair[slot % 2 == 1] * self.d_sae + latent[slot % 2 == 1]
        return n_pairs, image_keys.sort().values, caption_keys.sort().values

    def result(self, *, min_share: float = 0.0, seed: int = 0) -> dict:
        """{"n_pairs", "matched" [P], "mismatched" [P] float64 Jaccard scores, "derangement"
        [P] int (pair i's mismatched caption is pair derangement[i]'s), "auroc",
        "matched_mean", "mismatched_mean", "image_set_size_mean", "caption_set_size_mean",
        "min_share", "seed"}."""
        from .ood import auroc

        n_pairs, image_keys, caption_keys = self.sets(min_share=min_share)
        if n_pairs < 2:
            raise InputError(f"grounding needs at least 2 pairs (a mismatched caption is another pair's), got "
                             f"{n_pairs}")
        perm = derangement(n_pairs, seed)
        matched = jaccard_by_pair(image_keys, caption_keys, n_pairs, self.d_sae)
        inverse = torch.empty(n_pairs, dtype=torch.int64)
        inverse[torch.from_numpy(perm)] = torch.arange(n_pairs)
        # pair p's caption set is compared with the image of q = inverse[p] (perm[q] = p)
        moved = inverse[caption_keys // self.d_sae] * self.d_sae + caption_keys % self.d_sae
        mismatched = jaccard_by_pair(image_keys, moved.sort().values, n_pairs, self.d_sae)
        sizes = [torch.bincount(k // self.d_sae, minlength=n_pairs).double().mean().item()
                 for k in (image_keys, caption_keys)]
        return {"n_pairs": n_pairs, "matched": matched, "mismatched": mismatched, "derangement": perm,
                "auroc": auroc(mismatched, matched), "matched_mean": float(matched.mean()),
                "mismatched_mean": float(mismatched.mean()), "image_set_size_mean": sizes[0],
                "caption_set_size_mean": sizes[1], "min_share": float(min_share), "seed": int(seed)}


def _merge(keys_list: list, counts_list: list) -> tuple[torch.Tensor, torch.Tensor]:
    if not keys_list:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    keys, counts = torch.cat(keys_list), torch.cat(counts_list)
    unique, inverse = keys.unique(return_inverse=True)
    return unique, torch.zeros(unique.numel(), dtype=torch.int64).index_add_(0, inverse, counts)


def jaccard_by_pair(a_keys: torch.Tensor, b_keys: torch.Tensor, n_pairs: int, d_sae: int) -> np.ndarray:
    """Sets as sorted int64 keys pair * F + latent -> [n_pairs] float64 Jaccard |A_i & B_i|
    / |A_i | B_i| (0 when both are empty)."""
    inter = torch.bincount(a_keys[torch.isin(a_keys, b_keys)] // d_sae, minlength=n_pairs)
    size_a = torch.bincount(a_keys // d_sae, minlength=n_pairs)
    size_b = torch.bincount(b_keys // d_sae, minlength=n_pairs)
    union = size_a + size_b - inter
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros(())).numpy()


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """[n] int64 permutation with no fixed point (Sattolo's algorithm: a uniform random
    n-cycle), deterministic in ``seed``; n >= 2."""
    n = count("n", n, 2)
    if not is_int(seed):
        raise InputError(f"seed={seed!r} must be an int")
    rng = np.random.default_rng(int(seed))
    perm = np.arange(n, dtype=np.int64)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: never the position itself, so the cycle covers every index
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def pair_grounding(code, indices=None, *, pairs, kinds, d_sae: int | None = None, min_share: float = 0.0,
                   seed: int = 0) -> dict:
    """One-shot PairSets over one batch of codes of every pair's image and caption tokens."""
    sets = PairSets(_width(code) if d_sae is None else d_sae)
    sets.add(code, indices, pairs=pairs, kinds=kinds)
    return sets.result(min_share=min_share, seed=seed)
