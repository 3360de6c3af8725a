"""dsv3-train: train DeepSeek-V3-style MoE models and post-train them the DeepSeek-R1 way."""

__version__ = "0.1.0"
