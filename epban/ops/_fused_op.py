"""How the fused Triton ops are registered and called: one implementation, two doors.

- ``op``: a ``torch.library`` custom op (schema, fake kernel, autograd), which ``torch.compile``,
  ``opcheck``, FakeTensorMode and other dispatch modes need.
- An ``autograd.Function`` built from the same implementation, ``setup_context`` and
  ``backward``, which eager calls take.

Why two: a Python custom op is slow to call. Its dispatcher layers (the autograd key, the
redispatch below it, the backend key) cost about 70 us of host time per call more than the
same ``autograd.Function`` on this project's 2-core CPU machine
(``benches/bench_op_overhead.py``). The loss mode calls these ops about 80 times per step. A
step not captured in a CUDA graph waits on the host, so the dispatcher alone can cost more than
the GPU's work.

A call goes through the dispatcher (``op``) when anything may be watching or tracing it:
- ``torch.compile`` tracing;
- a TorchDispatchMode being active (FakeTensorMode, FlopCounterMode, ...);
- a functorch transform (vmap, grad) being active;
- a tensor subclass being among the arguments (fake or functional tensors).
Otherwise the ``autograd.Function`` runs, with the same values. ``EPBAN_FUSED_OPS_EAGER_DOOR=0``
sends every call through the custom op, as before the eager door existed. An op without an autograd
formula (a backward helper) runs its implementation directly, unless an input requires grad.
Then the dispatcher takes it, so that a backward through it raises as the custom op does.
"""
from __future__ import annotations

import os

import torch

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
EAGER_DOOR_VARIABLE = "EPBAN_FUSED_OPS_EAGER_DOOR"  # "0": every call through the custom op


def _functorch_active() -> bool:
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def needs_dispatcher(args) -> bool:
    """Whether a call with ``args`` must go through the custom op (see the module docstring)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or _functorch_active():
        return True
    if os.environ.get(EAGER_DOOR_VARIABLE) == "0":
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSOR_TYPES for a in args)


class FusedOp:
    """A custom op named ``name`` around ``impl`` (typed as ``torch.library.custom_op`` wants),
    callable like it; eager calls skip the dispatcher. ``register_fake`` and
    ``register_autograd`` take what the custom op's methods take."""

    def __init__(self, name: str, impl):
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.function = None  # the autograd.Function, once register_autograd has run

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self.function = type(f"Eager_{self.name.replace('::', '_')}", (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if needs_dispatcher(args):
            return self.op(*args)
        if self.function is not None:
            return self.function.apply(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.op(*args)
        return self.impl(*args)


def fused_op(name: str):
    """Decorator: ``@fused_op("epban::name")`` over a typed implementation gives a ``FusedOp``."""
    return lambda impl: FusedOp(name, impl)
