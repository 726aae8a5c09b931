"""pytest-benchmark suite (GPU): `python -m pytest benchmarks --benchmark-only`.

Each timed function synchronizes, so the host clock measures finished GPU work.
"""

import pytest
import torch

from saeengine import SAE, SAEConfig, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

D, K = 1024, 32


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.fixture(scope="module", params=[(4096, 2**16), (4096, 2**18)], ids=lambda p: f"N{p[0]}-F{p[1]}")
def problem(request):
    n, f = request.param
    x = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
    sae = SAE(SAEConfig(d_in=D, d_sae=f, k=K), device="cuda", seed=0)
    return x, sae


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_encode(benchmark, problem, backend):
    x, sae = problem
    W, b = sae.W_enc.detach().bfloat16(), sae.b_enc.detach().bfloat16()
    with torch.no_grad():
        benchmark(synced(lambda: ops.topk_encode(x, W, b, K, backend=backend, check=False)))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_forward_backward_auxk(benchmark, problem, backend):
    x, sae = problem
    dead = torch.rand(sae.cfg.d_sae, device="cuda") < 0.1

    def step():
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x.float(), dead_mask=dead, backend=backend, check=False)
        out.loss.backward()

    benchmark(synced(step))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_sparse_decode(benchmark, problem, backend):
    x, sae = problem
    n, f = x.shape[0], sae.cfg.d_sae
    values = torch.rand(n, K, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(0, f, (n, K), device="cuda")
    W = sae.W_dec.detach().bfloat16()
    benchmark(synced(lambda: ops.sparse_decode(values, indices, W, backend=backend, check=False)))
