"""Convert checkpoints between our DCP format and Hugging Face DeepseekV3 safetensors.

    python -m dsv3_train.convert --to-hf runs/toy/checkpoints/step_00000500 hf_out/
    python -m dsv3_train.convert --from-hf hf_dir/ dcp_out/

``--to-hf`` reads the model state of a DCP checkpoint: a training checkpoint (``step_*``; its
model config comes from the run's ``.hydra/config.yaml`` two levels up) or a ``--from-hf`` output
(config in its ``model_config.yaml``); ``--config`` names the YAML instead (a model preset such as
``configs/model/toy.yaml`` or a full composed config with a ``model:`` section).

``--from-hf`` writes a plain DCP *model state*: the same ``model.*`` entries as a training
checkpoint's model part, plus ``model_config.yaml``, but no optimizer, RNG or
``trainer_state.json`` (so it is never mistaken for a resumable training checkpoint). Read it with
:func:`load_dcp_model`, or convert it back with ``--to-hf``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp

from dsv3_train.config import ModelConfig
from dsv3_train.hf import load_hf_checkpoint, save_hf_checkpoint
from dsv3_train.model import Transformer

MODEL_CONFIG_FILE = "model_config.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config_from_yaml(path) -> ModelConfig:
    """A ModelConfig from a model preset YAML or a composed config with a ``model:`` section."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.load(str(path))
    if isinstance(node, DictConfig) and isinstance(node.get("model"), DictConfig):
        node = node.model
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
    return OmegaConf.to_object(merged)


def find_model_config(ckpt_dir, config: Optional[str] = None) -> ModelConfig:
    """The model config of a DCP checkpoint: --config, else model_config.yaml in the directory,
    else the run's .hydra/config.yaml two levels up (runs/<name>/checkpoints/step_*)."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [Path(config)] if config else [
        ckpt_dir / MODEL_CONFIG_FILE, ckpt_dir.parent.parent / ".hydra" / "config.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return model_config_from_yaml(candidate)
    raise FileNotFoundError(f"no model config for {ckpt_dir}: looked for "
                            f"{', '.join(str(c) for c in candidates)}; pass --config YAML")


@contextlib.contextmanager
def _quiet_dcp():
    with warnings.catch_warnings():  # DCP warns that a single process is single-process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_dcp_model(ckpt_dir, cfg: Optional[ModelConfig] = None) -> Transformer:
    """Our Transformer with the model state of a DCP checkpoint (training or --from-hf output)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").exists():
        raise FileNotFoundError(f"{ckpt_dir} is not a DCP checkpoint (no .metadata)")
    cfg = cfg or find_model_config(ckpt_dir)
    model = Transformer(cfg)
    state = {"model": model.state_dict()}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def save_dcp_model(model: Transformer, out_dir) -> Path:
    """Write the model state in DCP format (entries ``model.<name>``) plus model_config.yaml."""
    from omegaconf import OmegaConf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_dcp():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(out_dir), no_dist=True)
    (out_dir / MODEL_CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(model.cfg))))
    return out_dir


def to_hf(ckpt_dir, out_dir, config: Optional[str] = None, dtype: Optional[torch.dtype] = None,
          rope_interleave: bool = True) -> Path:
    """DCP checkpoint -> HF DeepseekV3 directory (config.json + model.safetensors)."""
    model = load_dcp_model(ckpt_dir, find_model_config(ckpt_dir, config))
    return save_hf_checkpoint(model, out_dir, rope_interleave=rope_interleave, dtype=dtype)


def from_hf(hf_dir, out_dir, mtp_depth: Optional[int] = None,
            dtype: torch.dtype = torch.float32) -> Path:
    """HF DeepseekV3 directory -> plain DCP model state + model_config.yaml."""
    model = load_hf_checkpoint(hf_dir, dtype=dtype, mtp_depth=mtp_depth)
    return save_dcp_model(model, out_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsv3_train.convert", description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-hf", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"),
                           help="our DCP checkpoint -> HF DeepseekV3 safetensors")
    direction.add_argument("--from-hf", nargs=2, metavar=("HF_DIR", "OUT_DIR"),
                           help="HF DeepseekV3 directory -> DCP model state")
    parser.add_argument("--config", help="--to-hf: model config YAML (default: model_config.yaml in "
                                         "CKPT_DIR, else CKPT_DIR/../../.hydra/config.yaml)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="tensor dtype written (default: --to-hf keeps the checkpoint's, "
                             "--from-hf float32); router weight and bias stay float32")
    parser.add_argument("--rope-layout", choices=("interleaved", "half-split"), default="interleaved",
                        help="--to-hf: rope_interleave=true (DeepSeek's layout) or false")
    parser.add_argument("--mtp-depth", type=int, default=None,
                        help="--from-hf: MTP modules to load (default: num_nextn_predict_layers); "
                             "0 for checkpoints written by transformers' save_pretrained")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.to_hf:
            out = to_hf(*args.to_hf, config=args.config, dtype=dtype,
                        rope_interleave=args.rope_layout == "interleaved")
        else:
            out = from_hf(*args.from_hf, mtp_depth=args.mtp_depth, dtype=dtype or torch.float32)
    except (ValueError, FileNotFoundError) as error:  # HFFormatError, ConfigError
        sys.exit(f"error: {error}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
