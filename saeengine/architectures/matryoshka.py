"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the dictionary
each reconstruct the input, so the first latents learn the coarse, general features and
the later ones refine them (where a plain SAE's child latents absorb their parents).

The code is the inner selection's (TopK or BatchTopK) over the whole dictionary, and so
are encode and decode at inference. A training forward decodes that code once per prefix
length m with the values of latents >= m masked to 0 (no second selection), in one
decoder node with the AuxK code; the loss is the mean of the prefixes' FVUs
(:mod:`saeengine.losses`) plus AuxK on the full reconstruction's residual, as TopK's.

Prefix lengths (ascending, the last is d_sae) are fixed (SAEConfig.matryoshka_prefixes) or
drawn each training step (matryoshka_random_prefixes = P: the full dictionary and P - 1
lengths m with P(length <= m) = (m / d_sae) ^ 0.5, Nabeshima's distribution; a length may
repeat and then counts twice). The draws are quasi-random: the golden-ratio sequence of a
step counter kept on the SAE (buffer ``prefix_step``, saved in checkpoints), so no host
sync and no generator state, and a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

import torch

from .base import Architecture, get_architecture, register
from .topk import decode_sparse

INNER = ("topk", "batchtopk")
PARETO_POWER = 0.5
_GOLDEN = 0.6180339887498949  # frac of the golden ratio: the most uniform additive sequence


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register
class Matryoshka(Architecture):
    name = "matryoshka"
    selects_k = True
    uses_auxk = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.inner = get_architecture(cfg.matryoshka_inner)(cfg)

    @classmethod
    def check_config(cls, cfg):
        if cfg.matryoshka_inner not in INNER:
            raise ValueError(f"SAEConfig.matryoshka_inner={cfg.matryoshka_inner!r}; choose one of {INNER}")
        fixed, d_sae = cfg.matryoshka_prefixes, cfg.d_sae
        if fixed != ():
            ok = (isinstance(fixed, tuple) and all(_is_int(m) for m in fixed) and fixed[0] >= 1
                  and all(a < b for a, b in zip(fixed, fixed[1:])) and fixed[-1] == d_sae)
            if not ok:
                raise ValueError(f"SAEConfig.matryoshka_prefixes={fixed!r} is invalid: give strictly ascending "
                                 f"positive ints ending at d_sae={d_sae}, e.g. ({max(1, d_sae // 8)}, {d_sae}), "
                                 "or () for random lengths")
        else:
            n = cfg.matryoshka_random_prefixes
            if not _is_int(n) or not 1 <= n <= d_sae:
                raise ValueError(f"SAEConfig.matryoshka_random_prefixes={n!r} is invalid: it must be an int in "
                                 f"[1, d_sae={d_sae}] (or give fixed matryoshka_prefixes)")
        get_architecture(cfg.matryoshka_inner).check_config(cfg)

    def add_state(self, sae, device):
        self.inner.add_state(sae, device)
        if not self.cfg.matryoshka_prefixes:
            sae.register_buffer("prefix_step", torch.zeros((), dtype=torch.int64, device=device))

    def encode(self, sae, xn, *, k, auxk, kernels):
        return self.inner.encode(sae, xn, k=k, auxk=auxk, kernels=kernels)

    def reconstruct(self, sae, xn, encoding, kernels):
        code = encoding.code
        masked = [torch.where(code.indices < m, code.values, 0) for m in self.prefix_lengths(sae)[:-1]]
        return decode_sparse(sae, xn, encoding, masked + [code.values], kernels)

    def prefix_lengths(self, sae) -> list:
        """This step's prefix lengths, ascending, the last d_sae: ints (fixed), or 0-dim
        int64 device tensors (drawn; a training forward then advances the counter)."""
        fixed, d_sae = self.cfg.matryoshka_prefixes, self.cfg.d_sae
        if fixed:
            return list(fixed)
        n = self.cfg.matryoshka_random_prefixes - 1
        if n == 0:
            return [d_sae]
        counter = sae.prefix_step * n + torch.arange(1, n + 1, device=sae.prefix_step.device)
        u = torch.frac(counter.double() * _GOLDEN)  # [n] in [0, 1)
        drawn = torch.ceil(d_sae * u.pow(1 / PARETO_POWER)).clamp(1, d_sae - 1).long().sort().values
        if sae.training:
            with torch.no_grad():
                sae.prefix_step.add_(1)
        return [*drawn.unbind(), d_sae]
