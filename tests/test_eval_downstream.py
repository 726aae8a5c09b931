"""Downstream metrics on a toy 2-block backbone against a hand computation of the spliced,
zero-ablated and mean-ablated outputs; a perfectly reconstructing SAE gives KL 0 and
agreement 1."""

import numpy as np
import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.backbones import Backbone
from saeengine.errors import InputError
from saeengine.eval.downstream import downstream_metrics

D, C = 4, 5


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(3, D, 1), torch.nn.Conv2d(D, C, 1)])

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.blocks[0](x))).mean((2, 3)) * 3


def toy():
    return Backbone(Toy(), "toy", image_size=2, mean=(0, 0, 0), std=(1, 1, 1), spatial=True)


def by_hand(model, pixels, replace):
    """The head's logits [n, C] with block 0's map [n, D, H, W] replaced by replace(map)."""
    h = model.blocks[0](pixels)
    return model.blocks[1](torch.tanh(replace(h))).mean((2, 3)) * 3


def kl_loop(p_logits, q_logits):
    total = 0.0
    for a, b in zip(p_logits.double().tolist(), q_logits.double().tolist()):
        p = np.exp(a) / np.exp(a).sum()
        q = np.exp(b) / np.exp(b).sum()
        total += float((p * np.log(p / q)).sum())
    return total / len(p_logits)


PIXELS = torch.randn(7, 3, 2, 2, generator=torch.Generator().manual_seed(1))


def test_metrics_match_a_hand_computation():
    backbone = toy()
    sae = SAE(SAEConfig(d_in=D, d_sae=16, k=2), seed=0)
    out = downstream_metrics(backbone, "blocks.0", sae, PIXELS, batch_size=3)
    model = backbone.model
    with torch.no_grad():
        clean = by_hand(model, PIXELS, lambda h: h)

        def through_sae(h):
            tokens = h.flatten(2).transpose(1, 2).reshape(-1, D)
            recon = sae.decode(sae.encode(tokens)).reshape(h.shape[0], -1, D)
            return recon.transpose(1, 2).reshape(h.shape)

        spliced = by_hand(model, PIXELS, through_sae)
        zero = by_hand(model, PIXELS, torch.zeros_like)
        mean = model.blocks[0](PIXELS).mean((0, 2, 3))
        meaned = by_hand(model, PIXELS, lambda h: mean.view(1, D, 1, 1).expand_as(h))
    assert out["n_images"] == 7
    assert out["kl_sae"] == pytest.approx(kl_loop(clean, spliced), rel=1e-5)
    assert out["kl_zero"] == pytest.approx(kl_loop(clean, zero), rel=1e-5)
    assert out["kl_mean"] == pytest.approx(kl_loop(clean, meaned), rel=1e-5)
    for name, other in (("sae", spliced), ("zero", zero), ("mean", meaned)):
        agree = float((clean.argmax(1) == other.argmax(1)).double().mean())
        assert out[f"top1_agreement_{name}"] == pytest.approx(agree)
    assert out["kl_recovered_zero"] == pytest.approx((out["kl_zero"] - out["kl_sae"]) / out["kl_zero"])
    assert out["kl_recovered_mean"] == pytest.approx((out["kl_mean"] - out["kl_sae"]) / out["kl_mean"])
    assert out["kl_sae"] > 0 and out["kl_zero"] > 0
    given = downstream_metrics(backbone, "blocks.0", sae, PIXELS, mean_activation=torch.zeros(D))
    assert given["kl_mean"] == pytest.approx(out["kl_zero"], rel=1e-6)  # a given mean is used as is


def perfect_sae():
    """Encoder and decoder [I; -I] with k = d: for every channel exactly one of x_i, -x_i
    is the positive one in the top d, so decode(encode(x)) = x exactly."""
    sae = SAE(SAEConfig(d_in=D, d_sae=2 * D, k=D), seed=0)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_a_perfect_reconstruction_gives_kl_zero_and_full_agreement():
    backbone = toy()
    out = downstream_metrics(backbone, "blocks.0", perfect_sae(), PIXELS)
    assert out["kl_sae"] == 0.0 and out["top1_agreement_sae"] == 1.0
    assert out["kl_recovered_zero"] == 1.0 and out["kl_recovered_mean"] == 1.0


def test_bad_input():
    backbone = toy()
    sae = SAE(SAEConfig(d_in=D, d_sae=16, k=2), seed=0)
    with pytest.raises(InputError, match=r"mean_activation has 3 values; blocks.0 has d=4"):
        downstream_metrics(backbone, "blocks.0", sae, PIXELS, mean_activation=torch.zeros(3))
    with pytest.raises(InputError, match="pixels must be a non-empty tensor"):
        downstream_metrics(backbone, "blocks.0", sae, PIXELS[:0])
    with pytest.raises(InputError, match=r"not logits \[B, C\]"):
        downstream_metrics(backbone, "blocks.0", sae, PIXELS, head=lambda px: backbone.forward(px)[:, 0])


def test_a_head_that_skips_the_layer_is_refused_not_scored_zero():
    backbone = toy()
    sae = SAE(SAEConfig(d_in=D, d_sae=16, k=2), seed=0)
    logits = torch.randn(7, 5)
    skip = lambda px: logits[: px.shape[0]]  # noqa: E731 - never runs the backbone
    for mean in (None, torch.zeros(D)):
        with pytest.raises(InputError, match="the head never ran blocks.0"):
            downstream_metrics(backbone, "blocks.0", sae, PIXELS, head=skip, mean_activation=mean)
