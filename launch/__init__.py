"""dsv3-launch: start training on one node (torchrun) or on Slurm, and plan a layout first.

``python -m launch`` (or the ``dsv3-launch`` console script) has four commands:

- ``local``: validate the composed config, then run torchrun on this machine (c10d rendezvous,
  ``--max-restarts`` for elastic restarts that resume from the latest checkpoint);
- ``slurm``: validate, render an sbatch script (``--dry-run`` prints it) and submit it;
- ``slurm-node``: what that script runs on each node: SLURM_* -> torchrun rendezvous;
- ``plan``: the process layout and a per-GPU memory estimate, for any preset and world size.

Nothing here imports torch at module level except where a command needs it, so ``plan`` and
``--dry-run`` stay fast on a login node.
"""
