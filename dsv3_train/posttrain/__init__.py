"""DeepSeek-R1-style post-training on our model: generated tasks with verifiable answers, rule-based
rewards, SFT, GRPO (with the DAPO / Dr. GRPO switches and MoE routing replay), rejection sampling
and distillation into dense students. The command line is ``dsv3-posttrain`` (cli.py).

Modules: tasks/ (problems, teachers), template, tokenizer, rewards, data, modeling, routing,
rollout, objective, sft, grpo, rejection, distill, replicas (data parallel), config, cli, demo.
Nothing heavy is imported here: reward worker processes import this package.
"""
