"""Transformer Engine backend (precision.linear=fp8, fp8_backend=te): TE's ``Linear`` and
``GroupedLinear`` under its block-scaling FP8 recipe (1x128 activation tiles, 128x128 weight
blocks, as DeepSeek-V3), on CUDA only. Asking for it without CUDA or TE raises a one-line
ConfigError with the install hint; nothing falls back to another backend.

Deferred weight gradients use TE's own ``delay_wgrad_compute``: an identity on each TE module's
input runs right after that module's backward and then calls ``backward_dw()`` at once, or queues
it in the ``defer_weight_grad`` sink. Untested here (no CUDA machine): see docs/precision.md.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from dsv3_train.precision.config import PrecisionConfig, config_error
from dsv3_train.precision.deferral import DefersWeightGrad

INSTALL_HINT = 'pip install -e ".[gpu]" on a CUDA machine, or set precision.fp8_backend=emulated'


def require_transformer_engine():
    """(transformer_engine.pytorch, its block-scaling recipe), or a one-line ConfigError."""
    if not torch.cuda.is_available():
        raise config_error("precision.fp8_backend='te' needs a CUDA GPU and Transformer Engine "
                          f"(torch.cuda.is_available() is False): {INSTALL_HINT}")
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except Exception as error:  # ImportError, or TE's own errors when its CUDA libraries are missing
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise config_error(f"precision.fp8_backend='te' needs Transformer Engine, which does not "
                          f"import ({first_line}): {INSTALL_HINT}") from None
    if not hasattr(recipe, "Float8BlockScaling"):
        raise config_error("precision.fp8_backend='te' needs Transformer Engine >= 2.3 (block-scaling "
                          f"recipe Float8BlockScaling missing): {INSTALL_HINT}")
    return te, recipe.Float8BlockScaling()


def _fp8_autocast(te, fp8_recipe):
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=fp8_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)


class _AfterInputGrad(torch.autograd.Function):
    """Identity on a TE module's input; its backward runs right after the module's backward."""

    @staticmethod
    def forward(ctx, x, te_module, sink_owner):
        ctx.te_module, ctx.sink_owner = te_module, sink_owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        sink = ctx.sink_owner.weight_grad_sink
        if sink is None:
            ctx.te_module.backward_dw()
        else:
            sink.add(ctx.te_module.backward_dw)
        return grad, None, None


def _hook_input(x: torch.Tensor, te_module: nn.Module, sink_owner: DefersWeightGrad) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return x
    if not x.requires_grad:  # the delayed wgrad must still be run: put the hook in the graph
        x = x.detach().requires_grad_()
    return _AfterInputGrad.apply(x, te_module, sink_owner)


class TEModule(DefersWeightGrad):
    """Mixin of the TE-backed factory modules; ``reset_weights`` is the model's normal init."""

    def reset_weights(self, std: float) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.rsplit(".", 1)[-1].startswith("weight"):
                    nn.init.normal_(param, 0.0, std)


@functools.lru_cache(maxsize=None)
def _te_classes():
    te, fp8_recipe = require_transformer_engine()

    class TELinear(TEModule, te.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _fp8_autocast(te, fp8_recipe):
                return super().forward(_hook_input(x, self, self))

    class TEGroupedExperts(TEModule, nn.Module):
        """E SwiGLU experts as two TE GroupedLinears (state dict: w13.weight{e}, w2.weight{e})."""

        def __init__(self, n_experts: int, dim: int, hidden: int):
            super().__init__()
            self.n_experts, self.hidden = n_experts, hidden
            kwargs = dict(bias=False, params_dtype=torch.float32, delay_wgrad_compute=True)
            self.w13 = te.GroupedLinear(n_experts, dim, 2 * hidden, **kwargs)  # [gate; up]
            self.w2 = te.GroupedLinear(n_experts, hidden, dim, **kwargs)

        def forward(self, x: torch.Tensor, tokens_per_expert) -> torch.Tensor:
            """x (M, D) grouped by expert, tokens_per_expert (E,) -> (M, D)."""
            if isinstance(tokens_per_expert, torch.Tensor):
                tokens_per_expert = tokens_per_expert.tolist()
            with _fp8_autocast(te, fp8_recipe):
                gate_up = self.w13(_hook_input(x, self.w13, self), tokens_per_expert)
                gate, up = gate_up.chunk(2, dim=-1)
                h = torch.nn.functional.silu(gate) * up
                return self.w2(_hook_input(h, self.w2, self), tokens_per_expert)

    return TELinear, TEGroupedExperts


def te_linear(in_features: int, out_features: int, bias: bool, precision: PrecisionConfig) -> nn.Module:
    te_linear_class, _ = _te_classes()
    return te_linear_class(in_features, out_features, bias=bias, params_dtype=torch.float32,
                           delay_wgrad_compute=True)


def te_grouped_experts(n_experts: int, dim: int, hidden: int, precision: PrecisionConfig) -> nn.Module:
    _, grouped_class = _te_classes()
    return grouped_class(n_experts, dim, hidden)
