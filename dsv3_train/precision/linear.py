"""The linear factory: every projection of the model is made by ``make_linear``.

A model picks its precision once, at construction: ``Transformer(cfg, precision)`` builds its
modules inside ``building_with(precision)``, and every ``make_linear`` / ``GroupedExperts`` made
without an explicit ``precision`` takes that one (else fp32). The scope is read only while modules
are constructed; each module then keeps its own ``precision`` -- nothing global at run time.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
from torch import nn

from dsv3_train.precision.config import PrecisionConfig
from dsv3_train.precision.deferral import DefersWeightGrad
from dsv3_train.precision.gemm import LinearFunction, ambient_dtype, gemms_for

_BUILDING: ContextVar[Optional[PrecisionConfig]] = ContextVar("dsv3_building_precision", default=None)


@contextlib.contextmanager
def building_with(precision: Optional[PrecisionConfig]) -> Iterator[None]:
    """Modules constructed inside the block default to ``precision`` (None: leave the default)."""
    token = _BUILDING.set(precision if precision is not None else _BUILDING.get())
    try:
        yield
    finally:
        _BUILDING.reset(token)


def resolve_precision(precision: Optional[PrecisionConfig] = None) -> PrecisionConfig:
    """An explicit precision, else the one of the enclosing ``building_with``, else fp32."""
    if precision is not None:
        return precision
    return _BUILDING.get() or PrecisionConfig()


class Linear(DefersWeightGrad, nn.Linear):
    """nn.Linear (same parameters, same state dict) whose three GEMMs follow a precision recipe.

    Master weight and its gradient stay fp32; the output has nn.Linear's dtype (the autocast dtype
    under autocast, else the input's).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 precision: Optional[PrecisionConfig] = None):
        super().__init__(in_features, out_features, bias=bias)
        self.precision = resolve_precision(precision)
        self.gemms = gemms_for(self.precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LinearFunction.apply(x, self.weight, self.bias, self, ambient_dtype(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, precision={self.precision.describe()}"


def make_linear(in_features: int, out_features: int, bias: bool = False,
                precision: Optional[PrecisionConfig] = None) -> nn.Module:
    """Every projection of the model is made here (bias-free by default, as in DeepSeek-V3)."""
    precision = resolve_precision(precision)
    if precision.uses_te:
        from dsv3_train.precision.te import te_linear

        return te_linear(in_features, out_features, bias, precision)
    return Linear(in_features, out_features, bias, precision)
