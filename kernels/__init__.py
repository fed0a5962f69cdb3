"""The Triton kernels of epban's fused ops, installed as ``epban.kernels``.

One module per op (``@triton.jit`` kernels and small jit helpers only; ``layout.py`` holds the
helpers the elementwise kernels share). Their launchers (grids, block sizes, plans) and the
custom ops around them live in ``epban.ops``; nothing here imports from ``epban``.
"""
