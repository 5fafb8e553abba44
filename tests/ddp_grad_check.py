"""One critic update and one generator update on a fixed global batch; rank 0 saves the gradients.

Run by tests/test_train.py twice: as one process, and under
`accelerate launch --multi_gpu --num_processes 2 --num_machines 1` (2 CPU processes over gloo),
each rank taking its half of the same global batch. DDP averages gradients over ranks, and every
loss is a per-sample mean, so both runs must produce the same gradients.
"""
import sys

import torch
from safetensors.torch import save_file

from a2b_dist.config import load_config
from a2b_dist.steps import build_models, make_accelerator
from a2b_dist.updates import A2BUpdates

from grad_batch import fixed_batch  # tests/, beside this script

out, config = sys.argv[1], sys.argv[2]
cfg = load_config(config, ["train.batch_size=4", *sys.argv[3:]])
acc = make_accelerator(cfg)
models = build_models(cfg, acc)
a, b, alpha, part = fixed_batch(cfg, acc)
updates = A2BUpdates(cfg, models, acc, torch.Generator())

updates.critic_update(a[part], b[part], alpha[part])
critic_grads = {f"D/{k}": p.grad.clone() for k, p in models.D.named_parameters()}
updates.generator_update(a[part], b[part], step=0)
gen_grads = {f"G/{k}": p.grad.clone() for k, p in models.G.named_parameters()}
# The generator update must leave the critic's gradients alone (frozen, unwrapped critic).
untouched = all(torch.equal(critic_grads[f"D/{k}"], p.grad) for k, p in models.D.named_parameters())
if acc.is_main_process:
    save_file({**critic_grads, **gen_grads,
               "critic_untouched": torch.tensor(untouched),
               "world": torch.tensor(acc.num_processes)}, out)
acc.wait_for_everyone()
