"""Deferred weight gradients for zero-bubble pipeline schedules (the ``W`` of ZB1P / DualPipe).

A backward pass run under ``defer_weight_grad(model)`` computes every factory linear's input
gradient as usual but, instead of its weight-gradient GEMM, queues a closure holding the operands.
``pending.compute()`` runs the queued GEMMs later and accumulates into ``param.grad`` exactly as
autograd would have. The queue is instance state of the context, never a global store, so each
(micro-batch, chunk) of a schedule can keep its own::

    with defer_weight_grad(chunk) as pending:   # B: input gradients only
        outputs.backward(grad_outputs)
    ...                                          # other micro-batches' work
    pending.compute()                            # W: the weight gradients
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn


class DeferredWeightGrads:
    """Weight-gradient closures queued by backward passes, run in order by ``compute``."""

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] = []

    def add(self, compute: Callable[[], None]) -> None:
        self._pending.append(compute)

    def __len__(self) -> int:
        return len(self._pending)

    def compute(self) -> None:
        """Run every queued weight-gradient GEMM (first queued first) and empty the queue."""
        while self.compute_one():
            pass

    def compute_one(self) -> bool:
        """Run the first queued GEMM (one linear, or one grouped-experts layer); False if none."""
        if not self._pending:
            return False
        with torch.no_grad():
            self._pending.pop(0)()
        return True


class DefersWeightGrad:
    """Mixin of every factory module: while ``weight_grad_sink`` is set, backward queues the
    weight-gradient GEMMs there instead of running them."""

    weight_grad_sink: Optional[DeferredWeightGrads] = None


@contextlib.contextmanager
def defer_weight_grad(model: nn.Module) -> Iterator[DeferredWeightGrads]:
    """Backward passes inside the block queue the weight gradients of ``model``'s linears."""
    pending = DeferredWeightGrads()
    modules = [m for m in model.modules() if isinstance(m, DefersWeightGrad)]
    previous = [m.weight_grad_sink for m in modules]
    for module in modules:
        module.weight_grad_sink = pending
    try:
        yield pending
    finally:
        for module, sink in zip(modules, previous):
            module.weight_grad_sink = sink


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (or = grad), in the parameter's dtype, as autograd's AccumulateGrad."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.contiguous()
    else:
        param.grad += grad
