"""Usage: /tmp/dsenv/bin/python bench/zero_eval/ds_init_timing.py [world=2]  -- times the first deepspeed.initialize
(ZeRO-1, "torch_adam": true) on gloo and reports whether any op was JIT-built (torch_extensions cache)."""
import glob
import os
import sys
import time

import torch
import torch.distributed as dist

from common import spawn


def worker(rank, world):
    t0 = time.perf_counter()
    import deepspeed
    t_import = time.perf_counter() - t0
    model = torch.nn.Linear(8, 8)
    t1 = time.perf_counter()
    engine, opt, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
                "zero_optimization": {"stage": 1}})
    t_init = time.perf_counter() - t1
    loss = engine(torch.randn(2, 8)).square().mean()
    engine.backward(loss)
    engine.step()
    t = torch.tensor([t_import, t_init])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"RESULT world={world}: import deepspeed {t[0]:.1f}s, first deepspeed.initialize {t[1]:.1f}s "
              f"(max over ranks); optimizer={type(opt).__name__}/{type(opt.optimizer).__name__}")


if __name__ == "__main__":
    cache = os.path.expanduser("~/.cache/torch_extensions")
    before = set(glob.glob(cache + "/**/*.so", recursive=True))
    spawn(worker, int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    after = set(glob.glob(cache + "/**/*.so", recursive=True))
    print(f"JIT-built extensions during the run: {sorted(after - before) or 'none'}")
