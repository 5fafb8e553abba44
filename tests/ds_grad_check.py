"""DeepSpeed engines' gradients against one plain process; rank 0 saves both sets.

Run by tests/test_deepspeed.py under
`accelerate launch --multi_gpu --num_processes 2 --num_machines 1` (2 CPU processes over gloo).
For ZeRO stage 0 and 1: one critic update and one generator update through DeepSpeedUpdates on each
rank's half of a fixed global batch, the reduced gradients read just before each engine.step();
then the same two updates on the whole batch with plain modules (A2BUpdates, no wrapper), the
single-process reference. A hook on every critic weight counts gradient accumulations, to show
the generator update leaves the critic alone.
"""
import sys

import torch
from safetensors.torch import save_file

from a2b_dist import ds_backend
from a2b_dist.compat import LoadThrough
from a2b_dist.config import load_config
from a2b_dist.nets import build_critic, build_generator
from a2b_dist.steps import build_models, make_accelerator
from a2b_dist.updates import A2BUpdates, Models

from grad_batch import fixed_batch  # tests/, beside this script

out, config = sys.argv[1], sys.argv[2]
saved: dict[str, torch.Tensor] = {}
for stage in (0, 1):
    cfg = load_config(config, ["train.batch_size=4", "train.backend=deepspeed", f"train.zero_stage={stage}"])
    ds_backend.require_deepspeed(cfg)
    from deepspeed.utils import safe_get_full_grad

    acc = make_accelerator(cfg)
    models = build_models(cfg, acc)
    assert isinstance(models.D_train.checkpoint_engine, LoadThrough)
    assert models.D_train.checkpoint_engine.load_file is ds_backend.load_weights_only
    a, b, alpha, part = fixed_batch(cfg, acc)

    grads: dict[str, torch.Tensor] = {}

    def capture(engine, net: str, module: torch.nn.Module):
        step = engine.step

        def step_after_reading_grads():
            for k, p in module.named_parameters():
                grads[f"{net}/{k}"] = safe_get_full_grad(p).detach().clone()
            step()
        engine.step = step_after_reading_grads

    capture(models.D_train, "D", models.D)
    capture(models.G_train, "G", models.G)
    accumulations = {"n": 0}
    for p in models.D.parameters():
        p.register_post_accumulate_grad_hook(lambda _: accumulations.__setitem__("n", accumulations["n"] + 1))
    updates = ds_backend.DeepSpeedUpdates(cfg, models, acc, torch.Generator())
    updates.critic_update(a[part], b[part], alpha[part])
    in_critic = accumulations["n"]
    updates.generator_update(a[part], b[part], step=0)
    in_generator = accumulations["n"] - in_critic

    # The reference: the same initial weights (build_models seeds from train.seed), whole batch.
    torch.manual_seed(cfg.train.seed)
    size, c = cfg.data.image_size, cfg.data.channels
    G, D = build_generator(cfg.model, c), build_critic(cfg.model, c, size)
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    ref = A2BUpdates(cfg, Models(G, D, G, D, opt_g, opt_d), acc, torch.Generator())
    ref.critic_update(a, b, alpha)
    ref_grads = {f"D/{k}": p.grad.clone() for k, p in D.named_parameters()}
    ref.generator_update(a, b, step=0)
    ref_grads.update({f"G/{k}": p.grad.clone() for k, p in G.named_parameters()})

    saved.update({f"z{stage}/ds/{k}": v for k, v in grads.items()})
    saved.update({f"z{stage}/ref/{k}": v for k, v in ref_grads.items()})
    saved[f"z{stage}/accumulations_in_critic"] = torch.tensor(in_critic)
    saved[f"z{stage}/accumulations_in_generator"] = torch.tensor(in_generator)
    saved[f"z{stage}/world"] = torch.tensor(acc.num_processes)
if acc.is_main_process:
    save_file(saved, out)
acc.wait_for_everyone()
