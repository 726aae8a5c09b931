"""Streaming top-k exemplar images per latent, by three rules, and one image's heatmap.

Rules (the saev paper's ``sort_by``; every score is a latent's value > 0, so a latent that
never fires keeps an all-pad row):

- ``"patch"``: the latent's max over one image's non-CLS tokens; the position is that
  token's (the smallest position on ties). Each image appears at most once per latent.
- ``"image"``: the latent's sum over the image's non-CLS tokens (float64, then float32);
  position -1.
- ``"cls"``: the latent's value on the image's CLS token; the position is the CLS token's.
  Images without a CLS token are no candidates.

Each row holds the top_k (image, score) pairs of one latent, by decreasing score, ties by
increasing image id. Merging a batch costs O(F x top_k + batch) memory: the batch's
candidates are ranked within their latent, the best top_k of each touched latent are
scattered into a [U, top_k] buffer (U = latents the batch touched) and merged with those
rows of the running [F, top_k] table by two stable sorts. No [tokens, F] tensor exists.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError, DataMismatchError, InputError
from ._args import is_int
from .aggregate import per_image
from .batch import TokenBatch

RULES = ("patch", "image", "cls")
FIELDS = ("scores", "images", "positions")
PAD_SCORE = float("-inf")
PAD_ID = -1


class Exemplars:
    """Accumulator (saeengine.eval protocol) of the top ``top_k`` images of every latent.

    Args:
        d_sae: number of latents F, >= 1.
        top_k: exemplars kept per latent K, >= 1 (the paper keeps 128).
        rules: a non-empty subset of ``("patch", "image", "cls")``.

    ``result()`` -> ``{rule: {"scores": [F, K] float32 (-inf pad), "images": [F, K] int64
    (-1 pad), "positions": [F, K] int64 (-1 pad)}}`` on the CPU.

    Batches must hold whole images (``TokenBatch``). An image id seen again in a later batch
    (a contract violation, e.g. the same store fed twice) keeps only its best score, so a
    row never lists an image twice.
    """

    def __init__(self, d_sae: int, top_k: int = 128, rules: Sequence[str] = RULES):
        if not is_int(d_sae) or d_sae < 1:
            raise ConfigError(f"d_sae={d_sae!r}: the number of latents must be an int >= 1 (the SAE's cfg.d_sae)")
        if not is_int(top_k) or top_k < 1:
            raise ConfigError(f"top_k={top_k!r}: exemplars per latent must be an int >= 1 (the paper uses 128)")
        if isinstance(rules, str):
            rules = (rules,)
        rules = tuple(dict.fromkeys(rules))
        unknown = [r for r in rules if r not in RULES]
        if unknown or not rules:
            raise ConfigError(f"rules={rules!r}: choose a non-empty subset of {RULES} "
                              f"({'unknown: ' + ', '.join(map(repr, unknown)) if unknown else 'none given'})")
        self.d_sae, self.top_k, self.rules = d_sae, top_k, rules
        self._tables = {rule: _empty_table(d_sae, top_k, torch.device("cpu")) for rule in rules}
        self._newest_image: dict[str, int] = {}  # largest image id merged per rule (a cache of the tables)

    # ----- accumulator protocol ---------------------------------------------------------
    @torch.no_grad()
    def update(self, batch: TokenBatch) -> None:
        """Merge one batch of whole images (values/indices [N, w], image/position/is_cls [N])."""
        values, indices = batch.values, batch.indices
        if values.shape != indices.shape or values.dim() != 2:
            raise InputError(f"batch.values {tuple(values.shape)} and batch.indices {tuple(indices.shape)} must "
                             "both be [N, w]; build them with saeengine.eval.batch.code_pairs")
        if values.shape[0] == 0:
            return
        self._check_latents(values, indices)
        device = values.device
        for rule in self.rules:
            self._tables[rule] = {f: t.to(device) for f, t in self._tables[rule].items()}
        patches = ~batch.is_cls
        if "patch" in self.rules or "image" in self.rules:
            agg = per_image(values, indices, batch.image, batch.position, tokens=patches)
            if "patch" in self.rules:
                self._merge("patch", agg.latents, agg.maxima, agg.images, agg.argmax)
            if "image" in self.rules:
                self._merge("image", agg.latents, agg.sums.float(), agg.images, torch.full_like(agg.images, PAD_ID))
        if "cls" in self.rules:
            agg = per_image(values, indices, batch.image, batch.position, tokens=batch.is_cls)
            self._merge("cls", agg.latents, agg.maxima, agg.images, agg.argmax)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact state: ``"{rule}.{scores|images|positions}"`` -> [F, K] CPU tensors."""
        return {f"{rule}.{f}": t.detach().cpu().clone().contiguous()
                for rule, table in self._tables.items() for f, t in table.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (same d_sae, top_k and rules)."""
        expected = {f"{rule}.{f}" for rule in self.rules for f in FIELDS}
        if set(state) != expected:
            raise DataMismatchError(f"exemplar state holds {sorted(state)}, but Exemplars(rules={self.rules}) "
                                    f"expects {sorted(expected)}; resume with the rules the state was saved with")
        for key, t in state.items():
            want = torch.float32 if key.endswith(".scores") else torch.int64
            if tuple(t.shape) != (self.d_sae, self.top_k) or t.dtype != want:
                raise DataMismatchError(f"exemplar state {key!r} is {tuple(t.shape)} {t.dtype}, expected "
                                        f"({self.d_sae}, {self.top_k}) {want}; resume with the d_sae and top_k "
                                        "the state was saved with")
        for rule in self.rules:
            device = self._tables[rule]["scores"].device
            self._tables[rule] = {f: state[f"{rule}.{f}"].to(device).clone() for f in FIELDS}
        self._newest_image = {}

    def result(self) -> dict:
        """``{rule: {"scores": [F, K] f32, "images": [F, K] int64, "positions": [F, K] int64}}`` (CPU)."""
        return {rule: {f: t.detach().cpu().clone() for f, t in table.items()} for rule, table in self._tables.items()}

    def exemplars(self, rule: str) -> dict:
        """One rule's result dict (the same call as the encoded-dataset reader's)."""
        if rule not in self.rules:
            raise ConfigError(f"rule={rule!r} was not accumulated; this Exemplars keeps {self.rules}")
        return self.result()[rule]

    # ----- internals --------------------------------------------------------------------
    def _check_latents(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        firing = indices[values > 0]  # padding slots (value 0) may hold any id
        if firing.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(firing))  # one host sync per batch
        if hi >= self.d_sae or lo < 0:
            bad = hi if hi >= self.d_sae else lo
            raise InputError(f"batch has latent id {bad}, outside [0, d_sae={self.d_sae}); the codes come from "
                             f"another SAE than Exemplars(d_sae={self.d_sae}): build it with that SAE's cfg.d_sae")

    def _merge(self, rule: str, latents: torch.Tensor, scores: torch.Tensor, images: torch.Tensor,
               positions: torch.Tensor) -> None:
        """Merge M candidates (each [M]; (latent, image) unique, image-ordered) into the rule's table."""
        if latents.numel() == 0:
            return
        table, k = self._tables[rule], self.top_k
        # A candidate below its latent's current k-th score can never enter the row: drop
        # it before sorting (once the tables fill, few candidates of a batch survive).
        hopeful = scores >= table["scores"][latents, k - 1]
        latents, scores, images, positions = latents[hopeful], scores[hopeful], images[hopeful], positions[hopeful]
        if latents.numel() == 0:
            return
        touched, buffer = batch_candidates(latents, scores, images, positions, k)
        rows = [torch.cat([table[f][touched], buffer[f]], dim=1) for f in FIELDS]
        # Images arrive in increasing order, so a batch's images are new to the table and
        # one top-k over an exact (score, image) key ranks each row; an image id seen
        # before (the same store fed twice) takes the slower path that drops repeats.
        lo, hi = (int(v) for v in torch.aminmax(images))
        seen = self._newest_image.get(rule)
        if seen is None:
            seen = self._newest_image[rule] = int(table["images"].max())
        best = top_rows_new_images(*rows, k) if seen < lo and hi <= _UINT32 else top_rows(*rows, k)
        self._newest_image[rule] = max(seen, hi)
        for f, t in zip(FIELDS, best):
            table[f][touched] = t


def _empty_table(d_sae: int, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {"scores": torch.full((d_sae, k), PAD_SCORE, dtype=torch.float32, device=device),
            "images": torch.full((d_sae, k), PAD_ID, dtype=torch.int64, device=device),
            "positions": torch.full((d_sae, k), PAD_ID, dtype=torch.int64, device=device)}


def _take(order: torch.Tensor, *ts: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
    if dim == 0:
        return [t[order] for t in ts]
    return [t.gather(dim, order) for t in ts]


def batch_candidates(latents: torch.Tensor, scores: torch.Tensor, images: torch.Tensor, positions: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """M candidates ([M] each, in increasing image order as per_image returns them) ->
    (touched latents [U] ascending, {"scores", "images", "positions"}: [U, k] buffers of
    each latent's best k by (score desc, image asc), padded)."""
    # Lexicographic (latent, -score, image): the input is image-ordered, so one stable sort
    # by the exact key (latent, -score) suffices.
    key = (latents << 32) | (_UINT32 - _score_bits(scores))
    order = torch.sort(key, stable=True).indices
    latents, scores, images, positions = _take(order, latents, scores, images, positions)
    touched, counts = torch.unique_consecutive(latents, return_counts=True)
    group = torch.repeat_interleave(torch.arange(touched.numel(), device=latents.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(latents.numel(), device=latents.device) - starts[group]
    keep = rank < k
    group, rank = group[keep], rank[keep]
    buffer = _empty_table(touched.numel(), k, latents.device)
    for f, t in zip(FIELDS, (scores, images, positions)):
        buffer[f][group, rank] = t[keep]
    return touched, buffer


_UINT32 = 0xFFFFFFFF


def _score_bits(scores: torch.Tensor) -> torch.Tensor:
    """float32 scores > 0 (or -inf pads, mapped to 0) -> int64 keys in [0, 2^32) with the
    scores' order: a non-negative float's bit pattern orders like its value."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64) & _UINT32
    return torch.where(scores > 0, bits, torch.zeros_like(bits))


def top_rows_new_images(scores: torch.Tensor, images: torch.Tensor, positions: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_rows` for rows whose real images are all distinct: one top-k over the
    exact int64 key (score bits, then the image id reversed) instead of three sorts."""
    key = (_score_bits(scores) << 32) | (_UINT32 - images.clamp(0, _UINT32))
    key = torch.where(images == PAD_ID, torch.full_like(key, -1), key)
    order = torch.topk(key, k, dim=1, sorted=True).indices
    return tuple(_take(order, scores, images, positions, dim=1))


def top_rows(scores: torch.Tensor, images: torch.Tensor, positions: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [U, C] of candidates (padded with -inf / -1) -> their best k columns [U, k] by
    (score desc, image asc), an image repeated in a row kept once (its best score)."""
    # Image-major order with the best score first, so a repeat follows its best entry.
    cols = [scores, images, positions]
    for key, desc in ((0, True), (1, False)):
        order = torch.sort(cols[key], dim=1, descending=desc, stable=True).indices
        cols = _take(order, *cols, dim=1)
    scores, images, positions = cols
    repeat = torch.zeros_like(images, dtype=torch.bool)
    repeat[:, 1:] = (images[:, 1:] == images[:, :-1]) & (images[:, 1:] != PAD_ID)
    scores = scores.masked_fill(repeat, PAD_SCORE)
    images = images.masked_fill(repeat, PAD_ID)
    positions = positions.masked_fill(repeat, PAD_ID)
    # Rows are image-ascending now: a stable sort by score leaves ties by increasing image.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return tuple(_take(order, scores, images, positions, dim=1))


def heatmap(values, indices, positions, latent: int, n_positions: int) -> torch.Tensor:
    """One image's activation of ``latent`` at every position.

    values [N, w] float, indices [N, w] int64: the code pairs of the image's N tokens
    (torch or numpy); positions [N] int64 in [0, n_positions). Returns [n_positions]
    float32 on the input's device: the latent's value on the token at each position (0
    where it does not fire or no token is; the max if tokens share a position).
    """
    values = torch.as_tensor(values).detach()
    indices = torch.as_tensor(indices, device=values.device)
    positions = torch.as_tensor(positions, device=values.device)
    if values.dim() != 2 or values.shape != indices.shape or positions.shape != values.shape[:1]:
        raise InputError(f"heatmap takes values and indices [N, w] and positions [N]; got {tuple(values.shape)}, "
                         f"{tuple(indices.shape)} and {tuple(positions.shape)}")
    if not is_int(n_positions) or n_positions < 1:
        raise InputError(f"n_positions={n_positions!r} must be an int >= 1 (the image's number of token positions)")
    if not is_int(latent) or latent < 0:
        raise InputError(f"latent={latent!r} must be an int >= 0 (a latent id of the SAE)")
    out = torch.zeros(n_positions, dtype=torch.float32, device=values.device)
    if positions.numel() == 0:
        return out
    lo, hi = (int(v) for v in torch.aminmax(positions))
    if lo < 0 or hi >= n_positions:
        raise InputError(f"token position {hi if hi >= n_positions else lo} is outside [0, n_positions="
                         f"{n_positions}); pass the image's token count as n_positions")
    hit = (indices == latent) & (values > 0)
    per_token = torch.where(hit, values.float(), torch.zeros((), device=values.device)).amax(1)
    return out.scatter_reduce_(0, positions.long(), per_token, reduce="amax")
