"""PrecisionConfig: which GEMM recipe every projection of the model uses."""
from __future__ import annotations

from dataclasses import dataclass

LINEAR_PRECISIONS = ("fp32", "bf16", "fp8")
FP8_BACKENDS = ("emulated", "te")


def config_error(message: str) -> ValueError:
    """dsv3_train.config.ConfigError(message), imported late: config.py may import this module."""
    from dsv3_train.config import ConfigError

    return ConfigError(message)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise config_error(message)


@dataclass
class PrecisionConfig:
    """Precision of the model's linears (attention projections, experts, shared experts, dense
    FFN). Embedding, output head, router, norms and the attention core never use it (V3 3.3.1)."""

    linear: str = "fp32"
    """fp32: the ambient dtype (fp32, or bf16 under train.precision=bf16 autocast), as nn.Linear;
    bf16: bf16 operands with fp32 master weights; fp8: E4M3 block-scaled GEMMs (DeepSeek-V3)."""
    fp8_backend: str = "emulated"
    """With linear=fp8: 'emulated' (portable torch, exact to the recipe) or 'te' (Transformer
    Engine's block-scaling recipe; needs CUDA and pip install -e ".[gpu]")."""
    tile: int = 128
    """FP8: activations and output gradients share one scale per 1 x tile along the GEMM's K."""
    block: int = 128
    """FP8: weights share one scale per block x block."""
    power_of_two_scales: bool = False
    """FP8: round each scale up to a power of two (exact dequantisation, as TE's block recipe)."""
    bf16_optimizer_moments: bool = False
    """Keep AdamW's first and second moments in bf16 between steps (V3 3.3.3)."""

    def __post_init__(self) -> None:
        _require(self.linear in LINEAR_PRECISIONS,
                 f"precision.linear ({self.linear!r}) must be one of {', '.join(LINEAR_PRECISIONS)}")
        _require(self.fp8_backend in FP8_BACKENDS,
                 f"precision.fp8_backend ({self.fp8_backend!r}) must be 'emulated' or 'te'")
        for name in ("tile", "block"):
            value = getattr(self, name)
            _require(value >= 16 and value & (value - 1) == 0,
                     f"precision.{name} ({value}) must be a power of two >= 16: use 128 (DeepSeek-V3)")

    @property
    def fp8(self) -> bool:
        return self.linear == "fp8"

    @property
    def uses_te(self) -> bool:
        return self.fp8 and self.fp8_backend == "te"

    def describe(self) -> str:
        """'fp32', 'bf16', 'fp8-emulated (1x128 / 128x128)' or 'fp8-te'."""
        if not self.fp8:
            return self.linear
        if self.uses_te:
            return "fp8-te"
        return f"fp8-emulated (1x{self.tile} / {self.block}x{self.block})"
