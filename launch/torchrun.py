"""The torchrun command line, for one node or for one node of many.

One node: ``--standalone`` (a c10d rendezvous store on a free local port, so concurrent runs on
one machine never collide). Many nodes: ``--rdzv-backend c10d`` with the head node's endpoint;
every node runs the same command and torchrun's agents agree on ranks. ``--max-restarts`` lets
the agents restart the whole worker group after a failure; the trainer then resumes from its
latest checkpoint (``checkpoint.resume=auto``).
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Optional

DEFAULT_MODULE = "dsv3_train.train"

TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""Workers get a fresh store each restart. With the default (the rendezvous store shared with the
workers, torch 2.13), restarted gloo workers read the previous attempt's addresses from the
shared store and hang in connect (see tests/distributed/test_elastic.py)."""


def torchrun_command(overrides: list[str], nproc_per_node: int, nnodes: int = 1, max_restarts: int = 0,
                     rdzv_endpoint: Optional[str] = None, rdzv_id: str = "dsv3", module: str = DEFAULT_MODULE,
                     python: str = sys.executable) -> list[str]:
    """The command (run it with TORCHRUN_ENV added to the environment)."""
    command = [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
               f"--max-restarts={max_restarts}"]
    if rdzv_endpoint is None:
        if nnodes > 1:
            raise ValueError("a multi-node rendezvous needs the head node's host:port")
        command.append("--standalone")
    else:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [*command, "-m", module, *overrides]


def exec_torchrun(command: list[str]) -> None:
    """Replace this process with torchrun, so that signals (Ctrl-C, Slurm's SIGTERM) reach it."""
    os.execve(command[0], command, {**os.environ, **TORCHRUN_ENV})


def shell_line(command: list[str]) -> str:
    """The command as a copy-paste shell line, environment included."""
    return " ".join(f"{k}={v}" for k, v in TORCHRUN_ENV.items()) + " " + shlex.join(command)
