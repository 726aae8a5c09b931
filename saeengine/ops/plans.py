"""Every plan the public calls can reach: the op plans enumerated over the requests, the
call shapes and the environments a call can meet (CPU, the interpreter, a GPU with or
without triton, the extension and validated kernels).

Used by tests/test_plans.py (each reachable plan must be exercised by a test) and by the
README's plan count (``python -m saeengine.ops.plans``). The environments are simulated:
:func:`simulated` patches what saeengine.backends sees, so this runs on any machine.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from unittest import mock

import torch

from saeengine import backends
from saeengine.backends import FAMILIES, BackendUnavailableError, names


@dataclass(frozen=True)
class Environment:
    """What a call can meet: the device type, and what is present there."""

    name: str
    device: str
    triton: bool
    extension: bool
    validated: bool
    interpreting: bool = False


ENVIRONMENTS = (
    Environment("cpu", "cpu", triton=True, extension=False, validated=False),
    Environment("cpu-interpreter", "cpu", triton=True, extension=False, validated=False, interpreting=True),
    Environment("gpu", "cuda", triton=True, extension=True, validated=True),
    Environment("gpu-unvalidated", "cuda", triton=True, extension=True, validated=False),
    Environment("gpu-no-extension", "cuda", triton=True, extension=False, validated=True),
    Environment("gpu-no-triton", "cuda", triton=False, extension=True, validated=True),
)


@contextlib.contextmanager
def simulated(env: Environment):
    """Make saeengine.backends see ``env`` (whatever this machine has)."""
    def need_problem(need, device):
        if need == "triton":
            if not env.triton:
                return "triton is not installed (simulated)"
            return "" if device.type == "cuda" or env.interpreting else "triton kernels need CUDA tensors (simulated)"
        if need == "extension":
            return "" if env.extension else "saeengine._C is not built (simulated)"
        if need == "cpu":
            return "" if device.type == "cpu" else "it runs on CPU tensors (simulated)"
        return "" if device.type == "cuda" else "it needs CUDA tensors (simulated)"

    validation = (lambda impl: "") if env.validated else (
        lambda impl: "never validated (simulated)" if impl.needs_validation else "")
    with mock.patch.object(backends, "_need_problem", need_problem), \
            mock.patch("saeengine.validation.cached_validation_problem", validation), \
            mock.patch.dict("os.environ", {"SAEENGINE_BACKEND": ""}):
        yield torch.device(env.device)


def requests(op: str) -> tuple[str, ...]:
    return ("auto", *names(op), *FAMILIES)


# (k, k_aux, n_subset): no AuxK; a narrow AuxK; a wide one (dense-eligible); one past the
# radix select's k limit and the dense bound.
ENCODE_SHAPES = ((8, 0, 0), (8, 16, 40), (8, 200, 1000), (8, 2000, 200_000))
# (compute dtype, weight dtype, weight_copies)
PRECISIONS = ((torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, None),
              (torch.bfloat16, torch.float32, False), (torch.bfloat16, torch.float32, True))


def topk_encode_plans() -> tuple[set, int]:
    """(the distinct TopKEncodePlans reachable, the number of calls refused with
    BackendUnavailableError)."""
    from saeengine.ops.topk_encode.plan import plan_topk_encode

    plans, refused = set(), 0
    for env in ENVIRONMENTS:
        with simulated(env) as device:
            for request, (k, k_aux, n_subset), (dtype, wdtype, copies), grad, sparse, dense in itertools.product(
                    requests("topk_encode"), ENCODE_SHAPES, PRECISIONS, (False, True), (False, True), (False, True)):
                weight = torch.empty(0, dtype=wdtype, device="meta")
                try:
                    plans.add(plan_topk_encode(request, device, dtype=dtype, k=k, k_aux=k_aux, n_subset=n_subset,
                                               needs_grad=grad, sparse_grad=sparse, weight=weight,
                                               weight_copies=copies, allow_dense_auxk=dense))
                except BackendUnavailableError:
                    refused += 1
    return plans, refused


def sparse_decode_plans() -> tuple[set, int]:
    from saeengine.ops.sparse_decode import plan_sparse_decode

    plans, refused = set(), 0
    for env in ENVIRONMENTS:
        with simulated(env) as device:
            for request, (dtype, wdtype, copies), grad, sparse in itertools.product(
                    requests("sparse_decode"), PRECISIONS, (False, True), (False, True)):
                weight = torch.empty(0, dtype=wdtype, device=device) if device.type == "cpu" else \
                    MetaTensor(wdtype, device)
                try:
                    plans.add(plan_sparse_decode(request, weight, dtype, needs_grad=grad, sparse_grad=sparse,
                                                 weight_copies=copies))
                except BackendUnavailableError:
                    refused += 1
    return plans, refused


def topk_select_plans() -> tuple[set, int]:
    from saeengine.ops.topk_select import select_implementation

    plans, refused = set(), 0
    for env in ENVIRONMENTS:
        with simulated(env) as device:
            for request, k, dtype in itertools.product(requests("topk_select"), (8, 2000),
                                                       (torch.float32, torch.float64)):
                try:
                    plans.add(select_implementation(request, MetaTensor(dtype, device), k))
                except BackendUnavailableError:
                    refused += 1
    return plans, refused


class MetaTensor:
    """What a plan reads of a tensor on a simulated device: dtype, device, size."""

    def __init__(self, dtype, device, numel: int = 0):
        self.dtype, self.device, self._numel = dtype, torch.device(device), numel
        self.is_cuda = False  # no real GPU behind it: the automatic weight read keeps copies

    def numel(self) -> int:
        return self._numel


def all_plans() -> dict[str, tuple[set, int]]:
    return {"topk_encode": topk_encode_plans(), "sparse_decode": sparse_decode_plans(),
            "topk_select": topk_select_plans()}


if __name__ == "__main__":
    for op, (plans, refused) in all_plans().items():
        print(f"{op}: {len(plans)} reachable plans ({refused} calls refused)")
        for plan in sorted(map(str, plans)):
            print("   ", plan)
