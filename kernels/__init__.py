"""Triton kernels of saeengine, installed as ``saeengine.kernels``.

Each module holds private ``@triton.jit`` kernels and the launchers that call them;
the autograd wiring and the torch references live in ``saeengine.ops``.
"""
