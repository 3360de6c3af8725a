"""Typed configuration: one dataclass per concern, validated on construction.

Hydra composes the YAML presets under ``configs/`` onto these schemas (registered in the
ConfigStore by :func:`register_configs`); library code only ever sees the dataclasses.
Every rule raises :class:`ConfigError` with a one-line message naming the value and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dsv3_train.precision.config import PrecisionConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Shape of a DeepSeek-V3-style model (field names follow DeepSeek's ``ModelArgs``)."""

    name: str = "toy"
    """Preset name; used in the run directory."""
    vocab_size: int = 2048
    """Vocabulary size; the tokenizer is trained to exactly this size."""
    dim: int = 128
    """Hidden size d of the residual stream."""
    n_layers: int = 3
    """Number of transformer blocks in the main model (MTP modules not counted)."""
    n_dense_layers: int = 1
    """The first k blocks use a dense SwiGLU FFN; the rest are MoE (HF: first_k_dense_replace)."""
    n_heads: int = 4
    """Attention heads."""
    inter_dim: int = 384
    """Hidden width of the dense FFN blocks."""
    moe_inter_dim: int = 64
    """Hidden width of each routed and shared expert."""
    n_routed_experts: int = 8
    """Fine-grained routed experts per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts, always active (fused into one SwiGLU of width n_shared * moe_inter_dim)."""
    n_activated_experts: int = 2
    """Top-k routed experts per token."""
    n_expert_groups: int = 2
    """Experts are split into this many groups for group-limited routing (1 disables it)."""
    n_limited_groups: int = 1
    """Groups kept per token (HF: topk_group)."""
    route_scale: float = 1.0
    """Gating weights are multiplied by this (HF: routed_scaling_factor; V3: 2.5)."""
    norm_topk_prob: bool = True
    """Normalise the k chosen affinities to sum to one before scaling (V3: true)."""
    balance_loss_alpha: float = 1e-4
    """Weight alpha of the complementary sequence-wise balance loss (0 switches it off)."""
    q_lora_rank: Optional[int] = None
    """Rank of the query down-projection; null gives a direct query projection."""
    kv_lora_rank: int = 32
    """Rank of the compressed KV latent c_KV (what the decode cache stores)."""
    qk_nope_head_dim: int = 32
    """Per-head query/key dims without rotary embedding."""
    qk_rope_head_dim: int = 16
    """Per-head query/key dims carrying the decoupled rotary embedding (key shared by heads)."""
    v_head_dim: int = 32
    """Per-head value dims."""
    max_seq_len: int = 512
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 1.0
    """YaRN scale factor s; 1 disables YaRN."""
    original_seq_len: int = 4096
    """Context length of pre-training before YaRN extension."""
    beta_fast: float = 32.0
    """YaRN: rotation count above which frequencies are kept (extrapolated)."""
    beta_slow: float = 1.0
    """YaRN: rotation count below which frequencies are fully interpolated."""
    mscale: float = 1.0
    """YaRN mscale coefficient for the rotary cos/sin (HF rope_scaling.mscale)."""
    mscale_all_dim: float = 1.0
    """YaRN mscale coefficient for the softmax scale, applied squared (HF mscale_all_dim)."""
    mtp_depth: int = 1
    """Multi-token prediction depth D (0 disables MTP)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Standard deviation of the normal weight initialisation (V3: 0.006)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "inter_dim", "moe_inter_dim",
                     "n_routed_experts", "n_activated_experts", "n_expert_groups",
                     "n_limited_groups", "qk_nope_head_dim", "v_head_dim", "max_seq_len"):
            value = getattr(self, name)
            _require(value > 0, f"model.{name} ({value}) must be > 0: set a positive value")
        _require(self.kv_lora_rank > 0,
                 f"model.kv_lora_rank ({self.kv_lora_rank}) must be > 0: MLA compresses keys and "
                 f"values into this latent; use e.g. 512 (V3) or 4*n_heads")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0,
                 f"model.q_lora_rank ({self.q_lora_rank}) must be > 0 or null "
                 f"(null = direct query projection)")
        _require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                 f"model.qk_rope_head_dim ({self.qk_rope_head_dim}) must be a positive even number: "
                 f"RoPE rotates pairs of dims")
        _require(0 <= self.n_dense_layers <= self.n_layers,
                 f"model.n_dense_layers ({self.n_dense_layers}) must be in [0, n_layers="
                 f"{self.n_layers}]")
        _require(self.n_shared_experts >= 0,
                 f"model.n_shared_experts ({self.n_shared_experts}) must be >= 0")
        _require(self.n_routed_experts % self.n_expert_groups == 0,
                 f"model.n_expert_groups ({self.n_expert_groups}) must divide n_routed_experts "
                 f"({self.n_routed_experts}): choose n_expert_groups in "
                 f"{_divisors(self.n_routed_experts)}")
        per_group = self.n_routed_experts // self.n_expert_groups
        _require(self.n_expert_groups == 1 or per_group >= 2,
                 f"model.n_expert_groups ({self.n_expert_groups}) leaves {per_group} expert per group; "
                 f"the group score sums each group's top-2 affinities: use at most "
                 f"{self.n_routed_experts // 2} groups")
        _require(self.n_limited_groups <= self.n_expert_groups,
                 f"model.n_limited_groups ({self.n_limited_groups}) must be <= n_expert_groups "
                 f"({self.n_expert_groups})")
        reachable = self.n_limited_groups * per_group
        _require(self.n_activated_experts <= reachable,
                 f"model.n_activated_experts ({self.n_activated_experts}) exceeds the {reachable} "
                 f"experts that n_limited_groups={self.n_limited_groups} groups of {per_group} hold: "
                 f"lower top-k or raise n_limited_groups")
        _require(self.route_scale > 0, f"model.route_scale ({self.route_scale}) must be > 0")
        _require(self.balance_loss_alpha >= 0,
                 f"model.balance_loss_alpha ({self.balance_loss_alpha}) must be >= 0 (0 = off)")
        _require(self.rope_factor >= 1.0,
                 f"model.rope_factor ({self.rope_factor}) must be >= 1 (1 = no YaRN)")
        _require(self.beta_fast > self.beta_slow > 0,
                 f"model.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow}) > 0")
        _require(self.mtp_depth >= 0, f"model.mtp_depth ({self.mtp_depth}) must be >= 0")
        _require(self.init_std > 0, f"model.init_std ({self.init_std}) must be > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, precision, balancing schedules."""

    steps: int = 500
    """Optimizer steps to train for."""
    seq_len: int = 128
    """Tokens per training sequence."""
    micro_batch_size: int = 16
    """Sequences per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (V3: 2.2e-5 / 2.2e-4)."""
    warmup_steps: int = 20
    """Linear warmup steps (capped at steps)."""
    decay_start_frac: float = 0.5
    """Fraction of steps after which the cosine decay starts (constant before)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (applied to matrices and embeddings, not to norm gains)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: str = "fp32"
    """Compute precision: fp32, or bf16 (autocast; master weights stay fp32)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    eval_every: int = 50
    """Run validation every this many steps (and at the first and last step)."""
    eval_batches: int = 4
    """Micro-batches of held-out data per validation."""
    log_every: int = 10
    """Print a metrics line every this many steps."""
    bias_update_speed: float = 1e-3
    """Auxiliary-loss-free balancing: bias step gamma per optimizer step (0 = off)."""
    bias_update_stop_frac: float = 1.0
    """Fraction of steps after which gamma is 0 (V3 stops it for the last 500B tokens)."""
    mtp_weight: float = 0.3
    """MTP loss weight lambda early in training."""
    mtp_weight_late: float = 0.1
    """MTP loss weight lambda after mtp_weight_switch_frac of the steps."""
    mtp_weight_switch_frac: float = 0.7
    """Fraction of steps after which lambda switches to mtp_weight_late (V3: 10T of 14.8T)."""
    mask_cross_document: bool = True
    """Ignore targets that lie in a different packed document than the input token."""
    threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    device: str = "auto"
    """Where the model trains: auto (this process's CUDA GPU when one is visible, else cpu), cuda
    (refused without a GPU), or cpu."""

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum", "eval_batches",
                     "log_every", "eval_every"):
            value = getattr(self, name)
            _require(value > 0, f"train.{name} ({value}) must be > 0")
        _require(self.lr > 0, f"train.lr ({self.lr}) must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"train.warmup_steps ({self.warmup_steps}) must be >= 0")
        _require(0 <= self.decay_start_frac <= 1,
                 f"train.decay_start_frac ({self.decay_start_frac}) must be in [0, 1]")
        _require(self.precision in ("fp32", "bf16"),
                 f"train.precision ({self.precision!r}) must be one of 'fp32', 'bf16'")
        _require(self.bias_update_speed >= 0,
                 f"train.bias_update_speed ({self.bias_update_speed}) must be >= 0")
        _require(self.grad_clip >= 0, f"train.grad_clip ({self.grad_clip}) must be >= 0 (0 = off)")
        _require(self.device in ("auto", "cuda", "cpu"),
                 f"train.device ({self.device!r}) must be one of 'auto', 'cuda', 'cpu'")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token shards."""

    source: str = "stdlib"
    """'stdlib' (the running interpreter's standard-library sources), a folder of text files,
    or a .jsonl file with a 'text' field."""
    tokenizer: Optional[str] = None
    """Path of an existing tokenizer.json; null trains a byte-level BPE to model.vocab_size."""
    cache_dir: str = "data_cache"
    """Where tokenizers and token shards are cached (keyed by source, size and vocab)."""
    max_bytes: int = 6_000_000
    """Read at most this many bytes of text (0 = all); keeps CPU set-up fast."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation."""
    shard_tokens: int = 4_000_000
    """Tokens per memmap shard file."""
    file_suffixes: str = ".py,.txt,.md,.rst"
    """Comma-separated suffixes read from a folder source."""

    def __post_init__(self) -> None:
        _require(0 < self.val_fraction < 0.5,
                 f"data.val_fraction ({self.val_fraction}) must be in (0, 0.5)")
        _require(self.max_bytes >= 0, f"data.max_bytes ({self.max_bytes}) must be >= 0 (0 = all)")
        _require(self.shard_tokens > 0, f"data.shard_tokens ({self.shard_tokens}) must be > 0")


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl and stdout."""

    kind: str = "stdout"
    """'stdout' or 'wandb'."""
    project: str = "dsv3-train"
    """wandb project."""
    group: Optional[str] = None
    """wandb group (sweeps set it to the sweep name)."""
    mode: Optional[str] = None
    """wandb mode: online, offline or disabled; null = online with an API key, else offline."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        _require(self.kind in ("stdout", "wandb"),
                 f"logger.kind ({self.kind!r}) must be 'stdout' or 'wandb'")
        _require(self.mode in (None, "online", "offline", "disabled"),
                 f"logger.mode ({self.mode!r}) must be online, offline, disabled or null")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and whether to resume."""

    every: int = 100
    """Save every this many optimizer steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """'auto' resumes from the run directory's latest checkpoint, 'never' starts fresh,
    anything else is a checkpoint directory to resume from."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"checkpoint.every ({self.every}) must be >= 0")
        _require(self.keep_last >= 1, f"checkpoint.keep_last ({self.keep_last}) must be >= 1")


@dataclass
class ParallelConfig:
    """How the world is split: pipeline x data, with experts sharded inside the data axis."""

    pp: int = 1
    """Pipeline-parallel ranks; the blocks are split into equal stages (see schedule)."""
    dp: int = 1
    """Data-parallel ranks; dense parameters are ZeRO-sharded over them."""
    ep: int = 1
    """Expert-parallel ranks inside dp: each holds n_routed_experts / ep experts."""
    zero_stage: int = 1
    """ZeRO stage via FSDP2: 1 and 2 shard optimizer states and gradients (same traffic), 3 params too."""
    schedule: str = "none"
    """Pipeline schedule: none (pp = 1), 1f1b, zb1p, dualpipe or dualpipev (micro-batches = train.grad_accum)."""
    overlap: bool = True
    """Overlap one micro-batch's expert all-to-all with another's compute inside F&B pairs."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (1, 2, 3),
                 f"parallel.zero_stage ({self.zero_stage}) must be 1, 2 or 3")
        schedules = ("none", "1f1b", "zb1p", "dualpipe", "dualpipev")
        _require(self.schedule in schedules,
                 f"parallel.schedule ({self.schedule!r}) must be one of {', '.join(schedules)}")
        _require(self.pp == 1 or self.schedule != "none",
                 f"parallel.pp ({self.pp}) > 1 needs a pipeline schedule: set parallel.schedule=dualpipe "
                 f"(or 1f1b, zb1p, dualpipev)")
        _require(self.pp == 1 or self.zero_stage < 3,
                 f"parallel.zero_stage ({self.zero_stage}) with parallel.pp ({self.pp}) > 1: a pipeline keeps "
                 f"parameters gathered across its micro-batches; use parallel.zero_stage=1")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp


@dataclass
class Config:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    name: str = "toy"
    """Run name; the run directory defaults to runs/<name>."""
    run_dir: str = "runs/toy"
    """Output directory of the run (metrics.jsonl, checkpoints, plots)."""

    def __post_init__(self) -> None:
        from dsv3_train.data.tokenizer import MIN_VOCAB_SIZE

        _require(self.model.vocab_size >= MIN_VOCAB_SIZE,
                 f"model.vocab_size ({self.model.vocab_size}) is too small for a byte-level BPE "
                 f"(256 bytes + special tokens): use at least {MIN_VOCAB_SIZE}")
        _require(self.train.seq_len <= self.model.max_seq_len,
                 f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                 f"({self.model.max_seq_len}): raise max_seq_len or shorten seq_len")
        from parallel.mesh import ParallelDims

        ParallelDims(self.parallel.pp, self.parallel.dp, self.parallel.ep).validate(model=self.model)
        if self.parallel.pp > 1:
            from parallel.pipeline import ScheduleError, validate

            try:
                validate(self.parallel.schedule, self.parallel.pp, self.train.grad_accum, self.model.n_layers)
            except ScheduleError as error:  # the schedule's micro-batches are train.grad_accum
                raise ConfigError(f"parallel.schedule: {str(error).replace('microbatches', 'train.grad_accum')}") from None
        _require(self.model.mtp_depth < self.train.seq_len,
                 f"model.mtp_depth ({self.model.mtp_depth}) must be < train.seq_len "
                 f"({self.train.seq_len})")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (YAML presets are validated against them)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    store.store(group="model", name="base_model", node=ModelConfig)
    store.store(group="train", name="base_train", node=TrainConfig)
    store.store(group="data", name="base_data", node=DataConfig)
    store.store(group="logger", name="base_logger", node=LoggerConfig)
    store.store(group="checkpoint", name="base_checkpoint", node=CheckpointConfig)
    store.store(group="parallel", name="base_parallel", node=ParallelConfig)
    store.store(group="precision", name="base_precision", node=PrecisionConfig)


def to_config(cfg) -> Config:
    """Turn a composed Hydra/OmegaConf config into a validated :class:`Config`."""
    from omegaconf import OmegaConf

    if isinstance(cfg, Config):
        return cfg
    return OmegaConf.to_object(cfg)
