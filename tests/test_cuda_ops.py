"""The csrc/ extension: it is built and registered; CPU tensors get a clear error;
on a GPU the op matches the reference and passes torch.library.opcheck."""

import pytest
import torch

import saeengine
from saeengine import ops
from saeengine._native import load_extension

from conftest import requires_gpu

built, why = load_extension()
requires_extension = pytest.mark.skipif(not built, reason=f"saeengine._C not built: {why}")


@requires_extension
def test_op_is_registered_with_schema():
    op = torch.ops.saeengine.sparse_decode.default
    assert "Tensor? bias" in str(op._schema)


@requires_extension
def test_cuda_op_on_cpu_tensors_raises_clear_error():
    v, i, w = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long), torch.rand(5, 4)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*backend=\"torch\""):
        torch.ops.saeengine.sparse_decode(v, i, w, None)
    with pytest.raises(saeengine.BackendUnavailableError, match="needs CUDA tensors"):
        ops.sparse_decode(v, i, w, backend="cuda")


@requires_extension
def test_fake_kernel_gives_output_shape():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        v = torch.empty(6, 3)
        i = torch.empty(6, 3, dtype=torch.long)
        w = torch.empty(10, 7)
        out = torch.ops.saeengine.sparse_decode(v, i, w, None)
    assert tuple(out.shape) == (6, 7)


@requires_gpu
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d,f", [(1, 1, 72, 100), (4096, 32, 1024, 2**16), (37, 5, 70, 333)])
def test_cuda_sparse_decode_matches_reference(dtype, n, k, d, f):
    values = torch.rand(n, k, device="cuda").to(dtype)
    indices = torch.randint(0, f, (n, k), device="cuda")
    W = torch.randn(f, d, device="cuda").to(dtype)
    b = torch.randn(d, device="cuda").to(dtype)
    out = ops.sparse_decode(values, indices, W, b, backend="cuda")
    ref = ops.sparse_decode_ref(values.double(), indices, W.double(), b.double())
    low = ops.sparse_decode_ref(values, indices, W, b)  # torch in the same dtype
    base_err = (low.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * base_err + 1e-6


@requires_gpu
@requires_extension
def test_cuda_sparse_decode_opcheck():
    values = torch.rand(8, 4, device="cuda", requires_grad=True)
    indices = torch.randint(0, 20, (8, 4), device="cuda")
    W = torch.randn(20, 16, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.saeengine.sparse_decode.default, (values, indices, W, b))
