"""AuxK through dense GEMMs over the dead latents, against the sparse path (the reference
encode over the dead subset, then the reference decode) under autograd."""

import pytest
import torch

from saeengine import ops

from conftest import grads_through


def _problem(n=10, d=24, f=90, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    W_enc = torch.randn(f, d, generator=gen)
    b_enc = 0.1 * torch.randn(f, generator=gen)
    W_dec = torch.randn(f, d, generator=gen) / d**0.5
    return x, W_enc, b_enc, W_dec


@pytest.mark.parametrize("k", [1, 7, 30])
def test_auxk_dense_matches_sparse_path(k):
    x, W_enc, b_enc, W_dec = _problem()
    subset = torch.arange(2, 90, 3)  # 30 latents: k=30 takes all of them
    weights = torch.randn(x.shape[0], x.shape[1])

    def weighted(code, recon):
        return (code, recon), (recon * weights).sum() + code.values.sum()

    def dense(x, W_enc, b_enc, W_dec):
        return weighted(*ops.auxk_dense(x, W_enc, b_enc, W_dec, subset, k))

    def reference(x, W_enc, b_enc, W_dec):
        code = ops.SparseCode(*ops.topk_encode_ref(x, W_enc, b_enc, k, latent_subset=subset))
        return weighted(code, ops.sparse_decode_ref(code.values, code.indices, W_dec))

    (code, recon), grads = grads_through(dense, x, W_enc, b_enc, W_dec)
    (ref_code, ref_recon), ref_grads = grads_through(reference, x, W_enc, b_enc, W_dec)
    positive = ref_code.values > 0  # zero entries may tie in any order
    assert torch.equal(code.indices[positive], ref_code.indices[positive])
    torch.testing.assert_close(code.values, ref_code.values)
    torch.testing.assert_close(recon, ref_recon, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "W_enc", "b_enc", "W_dec"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_auxk_dense_weight_gradients_are_sparse_rows_of_the_subset():
    x, W_enc, b_enc, W_dec = _problem(seed=1)
    subset = torch.tensor([3, 17, 40, 41, 88])
    W_enc.requires_grad_(True)
    W_dec.requires_grad_(True)
    code, recon = ops.auxk_dense(x, W_enc, b_enc, W_dec, subset, 2)
    recon.pow(2).sum().backward()
    for W in (W_enc, W_dec):
        assert W.grad.is_sparse and torch.equal(W.grad.coalesce().indices()[0], subset)
    assert bool(torch.isin(code.indices, subset).all())


def test_the_sae_plan_takes_dense_auxk_for_small_subsets_only():
    """What an SAE on a validated GPU runs for AuxK (k_aux=512) at 10% dead latents: dense
    GEMMs while the [N, S] matrix stays small (F=2^16, 2^18), the sparse kernels beyond
    (F=2^20); never on the reference, and never for a caller that does not decode."""
    from saeengine.ops.plans import ENVIRONMENTS, MetaTensor, simulated

    with simulated(ENVIRONMENTS[2]) as gpu:
        def auxk(n_dead, backend="auto", allow=True):
            return ops.plan_topk_encode(backend, gpu, dtype=torch.bfloat16, k=32, k_aux=512, n_subset=n_dead,
                                        needs_grad=True, weight=MetaTensor(torch.float32, gpu),
                                        allow_dense_auxk=allow).auxk

        assert auxk(6_554) == "dense" and auxk(26_214) == "dense"
        assert auxk(104_858) == "chunked"  # fused main code, wide AuxK code: selected in chunks
        assert auxk(6_554, backend="reference") == "reference"
        assert auxk(6_554, allow=False) == "chunked"
