"""The model: plain PyTorch, no process groups."""
from dsv3_train.model.moe import MoE, Router, routers, update_expert_biases
from dsv3_train.model.transformer import IGNORE_INDEX, LossTerms, Transformer, shifted_targets

__all__ = ["IGNORE_INDEX", "LossTerms", "MoE", "Router", "Transformer", "routers",
           "shifted_targets", "update_expert_biases"]
