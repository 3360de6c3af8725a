"""Post-training configs: one dataclass per command, validated on construction.

The YAML presets under ``configs/posttrain/`` are merged onto these (``load_config``) with
``key=value`` overrides from the command line; library code only sees the dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from dsv3_train.config import ConfigError, ModelConfig, TrainConfig, _require  # noqa: F401 (ConfigError re-exported)
from dsv3_train.posttrain.objective import LOSS_AGGREGATIONS
from dsv3_train.posttrain.rewards import RewardSpec


def _require_positive(section: str, cfg, names: Sequence[str]) -> None:
    for name in names:
        _require(getattr(cfg, name) > 0, f"{section}.{name} ({getattr(cfg, name)}) must be > 0")


@dataclass
class OptimConfig:
    """AdamW and its schedule (built by dsv3_train.trainer.build_optimizer / dsv3_train.schedule)."""

    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_start_frac: float = 1.0
    """Fraction of steps after which the cosine decay starts (1 = constant after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def train_config(self, steps: int) -> TrainConfig:
        """The pretraining TrainConfig that build_optimizer and schedule.learning_rate read."""
        return TrainConfig(steps=steps, lr=self.lr, warmup_steps=self.warmup_steps,
                           decay_start_frac=self.decay_start_frac, min_lr_ratio=self.min_lr_ratio,
                           weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2,
                           grad_clip=self.grad_clip)


@dataclass
class TaskConfig:
    """Which generated task, and how its problems are drawn."""

    name: str = "arithmetic"
    """arithmetic (multi-digit addition) or countdown."""
    digits: int = 3
    """arithmetic: digits per operand."""
    count: int = 3
    """countdown: how many numbers are given."""
    test_percent: int = 10
    """Share (%) of all problems held out for evaluation."""
    n_train: int = 4096
    """Training problems drawn (prompts for GRPO, rejection sampling and distillation)."""
    n_test: int = 200
    """Held-out problems for evaluation."""
    seed: int = 0
    """Seed of the problem draw (and of the cold-start teacher's mistakes)."""
    teacher_rate: float = 0.7
    """arithmetic cold start: how often the teacher drops the carry in its situation."""
    teacher_drop_column: int = 2
    """arithmetic cold start: the column (0 = units) whose incoming carry the teacher drops."""

    def options(self) -> dict:
        if self.name == "arithmetic":
            return {"digits": self.digits, "test_percent": self.test_percent}
        return {"count": self.count, "test_percent": self.test_percent}


@dataclass
class SFTConfig:
    """Supervised fine-tuning on prompt/completion pairs, loss on completion tokens only."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Examples per optimizer step (over all data-parallel ranks)."""
    micro_batch_size: int = 64
    """Examples per forward/backward on one rank."""
    packing: bool = False
    """Pack several examples per row of seq_len tokens (each attends only to itself)."""
    seq_len: int = 256
    """Row length when packing."""
    bias_update_speed: float = 0.0
    """Auxiliary-loss-free balancing speed during fine-tuning (0 = biases frozen)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    """Seed of the example order."""
    log_every: int = 50
    """Report metrics every this many steps."""

    def __post_init__(self) -> None:
        _require_positive("sft", self, ("steps", "batch_size", "micro_batch_size", "seq_len", "log_every"))


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimisation with the DAPO / Dr. GRPO switches (see objective.py)."""

    steps: int = 100
    """Rollout steps (each followed by inner_updates optimizer steps)."""
    prompts_per_step: int = 16
    """Groups per step, over all data-parallel ranks."""
    group_size: int = 8
    """G: samples per prompt."""
    max_new_tokens: int = 64
    """Generation budget per completion (also Dr. GRPO's constant normaliser)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1 samples the policy itself)."""
    top_p: Optional[float] = None
    """Nucleus sampling of the rollouts (None = off)."""
    beta: float = 0.0
    """KL penalty weight (k3 estimator) to the frozen initial policy; 0 loads no reference."""
    eps_low: float = 0.2
    """Ratio clip below: 1 - eps_low."""
    eps_high: float = 0.2
    """Ratio clip above: 1 + eps_high (DAPO clip-higher: 0.28)."""
    scale_std: bool = True
    """Divide advantages by the group std (Dr. GRPO: false)."""
    loss_aggregation: str = "seq-mean-token-mean"
    """seq-mean-token-mean (GRPO), token-mean (DAPO) or seq-mean-token-sum-norm (Dr. GRPO)."""
    inner_updates: int = 1
    """mu: optimizer steps on each rollout batch, ratios against the rollout's log-probs."""
    micro_batch_size: int = 64
    """Sequences per forward/backward on one rank."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal; sample more prompts to refill (DAPO)."""
    max_sampling_rounds: int = 3
    """With dynamic_sampling: rollout rounds at most per step."""
    routing_replay: bool = True
    """MoE: train on the experts each token was routed to during the rollout."""
    shuffle_advantages: bool = False
    """Control experiment: permute the advantages over the batch (destroys the signal)."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy", 1.0),
                                                                RewardSpec("format", 0.1)])
    """Rewards and their weights."""
    reward_workers: int = 1
    """Processes scoring rewards (0 = in this process, no timeout)."""
    reward_timeout_s: float = 30.0
    """Deadline for one batch's rewards; a reward that misses it scores None."""
    bias_update_speed: float = 0.0
    """Auxiliary-loss-free balancing speed during post-training (0 = biases frozen)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=0))
    seed: int = 0
    """Seed of the prompt order and of the sampling."""
    log_every: int = 10
    """Report metrics every this many steps."""
    eval_every: int = 25
    """Greedy held-out accuracy every this many steps (and at the first and last; 0 = never)."""

    def __post_init__(self) -> None:
        _require_positive("grpo", self, ("steps", "prompts_per_step", "group_size", "max_new_tokens",
                                         "inner_updates", "micro_batch_size", "max_sampling_rounds", "log_every"))
        _require(self.group_size >= 2, f"grpo.group_size ({self.group_size}) must be >= 2: advantages "
                                       f"compare samples of the same prompt")
        _require(self.loss_aggregation in LOSS_AGGREGATIONS,
                 f"grpo.loss_aggregation ({self.loss_aggregation!r}) must be one of {LOSS_AGGREGATIONS}")
        _require(0 <= self.eps_low < 1 and self.eps_high >= 0,
                 f"grpo.eps_low ({self.eps_low}) must be in [0, 1) and eps_high ({self.eps_high}) >= 0")
        _require(self.beta >= 0, f"grpo.beta ({self.beta}) must be >= 0 (0 = no reference model)")
        _require(self.temperature > 0, f"grpo.temperature ({self.temperature}) must be > 0: rollouts sample")


@dataclass
class SampleConfig:
    """Sampling many completions per prompt (rejection sampling, distillation)."""

    n_samples: int = 4
    """Completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy, then n_samples should be 1)."""
    max_new_tokens: int = 64
    """Generation budget."""
    batch_size: int = 256
    """Sequences decoded together."""
    seed: int = 0


@dataclass
class PosttrainConfig:
    """Everything one dsv3-posttrain command reads."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(mtp_depth=0))
    """The model built when no checkpoint is given (fresh SFT)."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(n_dense_layers=3, mtp_depth=0))
    """The distillation student (made dense: n_dense_layers = n_layers)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    student_sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT of the distillation student."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    threads: int = 1
    """torch intra-op threads."""


def load_config(paths: Sequence[str] = (), overrides: Sequence[str] = (),
                base: Optional[PosttrainConfig] = None) -> PosttrainConfig:
    """YAML presets merged in order onto ``base`` (default: PosttrainConfig()), then ``a.b=value``
    overrides."""
    from omegaconf import OmegaConf

    merged = OmegaConf.structured(base if base is not None else PosttrainConfig)
    for path in paths:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)
