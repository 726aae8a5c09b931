"""Every bad input gets an error that names the problem."""

import pytest
import torch

from saeengine import SAE, SAEConfig, ops


@pytest.fixture
def sae():
    return SAE(SAEConfig(d_in=16, d_sae=32, k=4), seed=0)


def test_wrong_feature_size(sae):
    with pytest.raises(ValueError, match=r"x has 15 columns but 16 are expected"):
        sae.encode(torch.randn(4, 15))
    with pytest.raises(ValueError, match="must be 2-D"):
        sae(torch.randn(16))


@pytest.mark.parametrize("k", [0, -1, 33])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k="):
        SAEConfig(d_in=16, d_sae=32, k=k)
    with pytest.raises(ValueError, match=r"1 <= k <= d_sae=32"):
        ops.topk_encode(torch.randn(3, 16), torch.randn(32, 16), torch.zeros(32), k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_raise_by_default(sae, bad):
    x = torch.randn(4, 16)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        sae(x)
    with pytest.raises(ValueError, match="non-finite"):
        sae.encode(x)
    sae.encode(x, check=False)  # the documented opt-out


def test_mixed_devices_and_dtypes():
    x, W, b = torch.randn(3, 16), torch.randn(32, 16), torch.zeros(32)
    with pytest.raises(TypeError, match=r"W_enc is torch.float64 but x is torch.float32.*float32 \(master weights\)"):
        ops.topk_encode(x, W.double(), b, 4)
    with pytest.raises(ValueError, match="different devices"):
        ops.topk_encode(x, W.to("meta"), b, 4)
    with pytest.raises(TypeError, match="W_dec is torch.float16 but values is torch.bfloat16"):
        ops.sparse_decode(torch.rand(3, 4).bfloat16(), torch.zeros(3, 4, dtype=torch.long), W.half())


def test_sae_rejects_input_on_another_device(sae):
    with pytest.raises(ValueError, match="x is on meta but the SAE is on cpu"):
        sae.encode(torch.randn(4, 16, device="meta"))


def test_empty_batch(sae):
    with pytest.raises(ValueError, match="empty batch"):
        sae(torch.randn(0, 16))
    with pytest.raises(ValueError, match="empty batch"):
        ops.sparse_decode(torch.rand(0, 4), torch.zeros(0, 4, dtype=torch.long), torch.randn(32, 16))


def test_indices_out_of_range():
    W = torch.randn(32, 16)
    for bad in (32, -1):
        idx = torch.zeros(3, 4, dtype=torch.long)
        idx[1, 2] = bad
        with pytest.raises(IndexError, match=r"must lie in \[0, 31\]"):
            ops.sparse_decode(torch.rand(3, 4), idx, W)
    with pytest.raises(TypeError, match="indices must be int64"):
        ops.sparse_decode(torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.int32), W)
    with pytest.raises(ValueError, match="indices has"):
        ops.sparse_decode(torch.rand(3, 4), torch.zeros(3, 5, dtype=torch.long), W)


def test_bad_config_values():
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(ValueError, match="normalization"):
        SAEConfig(d_in=4, d_sae=8, k=2, normalization="zscore")
    with pytest.raises(ValueError, match="dtype"):
        SAEConfig(d_in=4, d_sae=8, k=2, dtype="float64")


def test_dead_mask_checks(sae):
    with pytest.raises(ValueError, match=r"dead_mask must have shape \[32\]"):
        sae(torch.randn(4, 16), dead_mask=torch.zeros(31, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        sae(torch.randn(4, 16), dead_mask=torch.zeros(32))
    dead = torch.zeros(32, dtype=torch.bool)
    with pytest.raises(ValueError, match="not both"):
        ops.topk_encode(torch.randn(4, 16), sae.W_enc, sae.b_enc, 4, dead_mask=dead, dead_latents=torch.tensor([1]),
                        k_aux=2)
    with pytest.raises(IndexError, match=r"must lie in \[0, 31\]"):
        ops.topk_encode(torch.randn(4, 16), sae.W_enc, sae.b_enc, 4, dead_latents=torch.tensor([3, 32]), k_aux=2)
