"""The ops of epban, one module each: the math in its docstring, the PyTorch reference, the input
checks, the ``torch.library`` custom op around the kernels, their launchers, and one dispatch
through ``registry.use_fused`` (the availability rule). Each module registers its op in
``registry.REGISTRY``, which ``epban.info()`` lists."""
