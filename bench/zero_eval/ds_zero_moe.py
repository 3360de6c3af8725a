"""Usage: /tmp/dsenv/bin/python bench/zero_eval/ds_zero_moe.py [engine|direct1|direct2|deferred1|deferred2] [world=4] [ep=2]

Does DeepSpeed ZeRO-1/2 (0.19.8) reduce dense grads over our `dp` group and local-shard expert grads over
our `edp` group (both from parallel/mesh.py), with 2 micro-batches accumulated and one step?
  engine     deepspeed.initialize(mpu=<our dp group>), expert param tagged allreduce=False/group_name
  engine_plain  the same without the MoE tags (what the engine does with a non-DeepSpeed MoE layer)
  directN    DeepSpeedZeroOptimizer built by hand with our dp/ep/edp groups (stage N), driven without the engine
  deferredN  as directN, but each micro-batch's backward is split into stage_backward_input + a later
             stage_backward_weight (torch.distributed.pipelining), as zero-bubble schedules do
             (stage 1: reduce_gradients(pipeline_parallel=True) at the boundary, as DeepSpeed's PipelineEngine)
  deferred2hook  deferred2 plus calling ZeRO-2's private per-param hook body (process_gradients) by hand after dW
SGD(lr=1) so the parameter change equals minus the reduced gradient; compared with a hand-reduced reference.
"""
import sys

import torch
import torch.distributed as dist

from common import TinyMoE, micro_batches, reference_grads, spawn

N_MICRO = 2


class OurMpu:
    """Megatron-style mpu that hands DeepSpeed OUR data-parallel group (the only group the engine accepts)."""

    def __init__(self, dp_group):
        self.g = dp_group

    def get_data_parallel_group(self): return self.g
    def get_data_parallel_world_size(self): return dist.get_world_size(self.g)
    def get_data_parallel_rank(self): return dist.get_rank(self.g)
    def get_model_parallel_group(self): return None
    def get_model_parallel_world_size(self): return 1
    def get_model_parallel_rank(self): return 0
    def get_tensor_model_parallel_world_size(self): return 1
    def get_tensor_model_parallel_rank(self): return 0
    def get_pipeline_model_parallel_world_size(self): return 1


def worker(rank, world, mode, ep):
    from parallel.mesh import ParallelDims
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils.timer import NoopTimer
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm wrapper adopts the existing group
    dims = ParallelDims(dp=world, ep=ep)
    pm = dims.build_mesh("cpu")
    dp_g, ep_g, edp_g = pm.group("dp"), pm.group("ep"), pm.group("edp")
    coords = dims.rank_coordinates(rank)
    name = f"ep_size_{ep}"

    model = TinyMoE(coords["ep"])
    if mode != "engine_plain":
        model.expert.allreduce = False  # DeepSpeed's MoE-param marker (deepspeed/moe/utils.py:is_moe_param)
        model.expert.group_name = name
    ref_model = TinyMoE(coords["ep"])
    batches = micro_batches(rank, N_MICRO)
    ref_d, ref_e = reference_grads(ref_model, batches, dp_g, edp_g, world)
    before = (model.dense.detach().clone(), model.expert.detach().clone())

    if mode.startswith("engine"):
        groups = ([{"params": [model.dense]}, {"params": [model.expert], "moe": True, "name": name}]
                  if mode == "engine" else [{"params": [model.dense, model.expert]}])
        engine, opt, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(groups, lr=1.0), mpu=OurMpu(dp_g),
            config={"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": N_MICRO,
                    "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
        changed = torch.tensor(float(not torch.equal(before[1], model.expert.detach())))
        dist.all_reduce(changed)
        if rank == 0:
            print(f"ranks whose local expert shard deepspeed.initialize overwrote: {int(changed)} of {world}")
        for x in batches:
            engine.backward(engine(x).square().mean())
            engine.step()
    else:
        stage = int(mode.replace("hook", "")[-1])
        groups = [{"params": [model.dense], "name": "dense"},
                  {"params": [model.expert], "moe": True, "name": name}]
        opt = DeepSpeedZeroOptimizer(
            torch.optim.SGD(groups, lr=1.0), {p: n for n, p in model.named_parameters()}, timers=NoopTimer(),
            optimizer_params={}, dp_process_group=dp_g, expert_parallel_group={name: ep_g},
            expert_data_parallel_group={name: edp_g}, has_moe_layers=True, partition_grads=(stage == 2),
            reduce_scatter=True, contiguous_gradients=True, overlap_comm=False,
            gradient_accumulation_steps=N_MICRO, communication_data_type=torch.float32)
        fired = [0]
        for p in model.parameters():  # same hook kind ZeRO-2 uses (deepspeed/utils/torch.py:register_grad_hook)
            p.register_post_accumulate_grad_hook(lambda _p: fired.__setitem__(0, fired[0] + 1))
        if mode.startswith("deferred"):
            opt.setup_buckets()  # normally done by the first grad hook; without it reduce paths IndexError
        for i, x in enumerate(batches):
            last = i == N_MICRO - 1
            opt.set_gradient_accumulation_boundary(last)
            loss = model(x).square().mean() / N_MICRO
            # mirror DeepSpeedEngine.backward/_backward_prologue/_backward_epilogue (engine.py:3122-3178)
            opt.backward_prologue()
            opt.enter_backward()
            if mode.startswith("direct"):
                loss.backward()
            else:  # dI now, dW later (outside loss.backward), as ZB/DualPipe schedules do
                x = x.requires_grad_(True)
                loss = model(x).square().mean() / N_MICRO
                _, pgroups = stage_backward_input([loss], None, [x], iter(list(model.parameters())))
                stage_backward_weight(iter(list(model.parameters())), pgroups)
                if mode == "deferred2hook":
                    for gi, group in enumerate(opt.bit16_groups):
                        for p in group:
                            opt.process_gradients(p, gi)
            if stage == 2:
                opt.overlapping_partition_gradients_reduce_epilogue()  # what engine.allreduce_gradients does
            elif last:
                opt.reduce_gradients(pipeline_parallel=mode.startswith("deferred"))
            opt.backward_epilogue()
            opt.exit_backward()
        if rank == 0:
            print(f"post-accumulate-grad hooks fired: {fired[0]} (2 params x {N_MICRO} micro-batches = {2 * N_MICRO})")
            print("param.grad after reduce (None => taken by ZeRO):",
                  {n: (None if p.grad is None else float(p.grad.norm())) for n, p in model.named_parameters()})
        opt.step()

    got_d, got_e = before[0] - model.dense.detach(), before[1] - model.expert.detach()
    err_d = float((got_d - ref_d).abs().max() / ref_d.abs().max())
    err_e = float((got_e - ref_e).abs().max() / ref_e.abs().max())
    res = torch.tensor([err_d, err_e])
    out = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(out, res)
    if rank == 0:
        worst = torch.stack(out).max(0).values
        ok = bool((worst < 1e-5).all())
        print(f"RESULT mode={mode} world={world} ep={ep}: max rel err dense={worst[0]:.3e} expert={worst[1]:.3e} "
              f"-> {'CORRECT' if ok else 'WRONG'}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "direct1"
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    ep = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    spawn(worker, world, mode, ep)
