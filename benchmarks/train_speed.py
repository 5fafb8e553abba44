#!/usr/bin/env python
"""Training speed: the toolkit's step against a minimal hand-written PyTorch loop, same process.

    python benchmarks/train_speed.py --size 64 --batch 16 --precision no     # CPU, demo-size model
    python benchmarks/train_speed.py --size 64 --batch 16 --precision bf16
    python benchmarks/train_speed.py --size 256 --batch 16 --precision bf16 --device cuda \
        --width 64 --res-blocks 6 --critic-width 64 --channels-last --compile   # paper model on a GPU

(a) toolkit: the trainer's own step function, a2b_dist.steps.train_step (both learning rates from
    the schedule, n_critic critic updates, one generator update), then StepAgreement (the loss
    vector's all-reduce when distributed, the finite check, the running sums), as train() runs them.
(b) bare: plain PyTorch written here from the same networks (a2b_dist.nets) and the same maths:
    2 critic steps with the WGAN gradient penalty through autograd.grad, then 1 generator step.

Both read pre-generated batches from memory, so only compute is compared. Runs alternate
(toolkit, bare, toolkit, ...) and each side reports its median over --repeats runs.
images/s counts images drawn from the data per step, as train() logs it: n_critic x 2 roles x batch.
FLOPs per iteration are counted with torch.utils.flop_counter.FlopCounterMode over one bare step
(forward, double backward and backward; the optimizer's elementwise work is not counted).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from a2b_dist import backends  # noqa: E402
from a2b_dist.config import load_config  # noqa: E402
from a2b_dist.nets import build_critic, build_generator  # noqa: E402
from a2b_dist.steps import (StepAgreement, build_models, derive_seed, make_accelerator,  # noqa: E402
                           train_step)

N_BATCHES = 4  # distinct in-memory batches cycled through (per role)


def make_config(args):
    return load_config(None, [
        f"data.image_size={args.size}", "data.channels=1", f"model.width={args.width}",
        f"model.res_blocks={args.res_blocks}", f"model.critic_width={args.critic_width}",
        f"train.batch_size={args.batch}", f"train.mixed_precision='{args.precision}'",
        f"train.channels_last={str(args.channels_last).lower()}", f"train.compile={str(args.compile).lower()}",
        f"train.cpu={str(args.device == 'cpu').lower()}", "train.steps=400000", "optim.decay_steps=100000"])


def make_batches(cfg, device: torch.device, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n, s, fmt = cfg.train.batch_size // world, cfg.data.image_size, (
        torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    return [tuple((torch.rand(n, 1, s, s, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
                  for _ in range(2)) for _ in range(N_BATCHES)]


def toolkit_stepper(cfg, accelerator=None, batches=None) -> tuple[Callable[[int], dict], object]:
    """The trainer's own step (a2b_dist.steps.train_step, then StepAgreement's all-reduce and finite
    check), fed from memory: ``batches`` (default make_batches) is a list of (A, B) pairs, each role
    drawing its next one in turn. step(i) returns that step's losses (LOSS_TERMS, as tensors)."""
    acc = accelerator if accelerator is not None else make_accelerator(cfg)
    models = build_models(cfg, acc)
    device, world = acc.device, acc.num_processes
    gp_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.train.seed, acc.process_index, 7))
    updates = backends.get(cfg.train.backend).updates(cfg, models, acc, gp_gen)
    batches = batches if batches is not None else make_batches(cfg, device, world)
    agreement = StepAgreement(world, device, fp16=acc.scaler is not None and acc.scaler.is_enabled())
    draws = {"mixed": 0, "healthy": 0}
    models.G_train.train(), models.D_train.train()

    def next_batch(role: str) -> torch.Tensor:
        pair = batches[draws[role] % len(batches)]
        draws[role] += 1
        return pair[0 if role == "mixed" else 1]

    def step(i: int) -> dict:
        stats, _ = train_step(cfg, models, updates, next_batch, i)
        agreement.agree(stats, False, i + 1)
        return stats

    return step, acc


def bare_stepper(cfg, device: torch.device) -> Callable[[int], None]:
    """The same iteration in plain PyTorch: no accelerate, no loss module, no bookkeeping."""
    torch.manual_seed(cfg.train.seed)
    G = build_generator(cfg.model, 1).to(device)
    D = build_critic(cfg.model, 1, cfg.data.image_size).to(device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)
    G_fwd = torch.compile(G) if cfg.train.compile else G
    o, lo = cfg.optim, cfg.loss
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    prec = cfg.train.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    scaler = torch.amp.GradScaler(device.type, enabled=prec == "fp16")
    batches = make_batches(cfg, device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step(i: int) -> None:
        for k in range(o.n_critic):
            a, b = batches[(i * o.n_critic + k) % N_BATCHES]
            n = a.shape[0]
            with torch.no_grad(), autocast():
                b_int, m = G(a)
                fake = (b_int * m + a * (1 - m)).float()
            alpha = torch.rand(n, 1, 1, 1, device=device)
            x_hat = (alpha * b + (1 - alpha) * fake).requires_grad_(True)
            with autocast():
                d_real, d_fake, d_hat = D(torch.cat([b, fake, x_hat])).split(n)
            out = d_hat.float().sum() * scaler.get_scale() if scaler.is_enabled() else d_hat.float().sum()
            (grad,) = torch.autograd.grad(out, x_hat, create_graph=True)
            if scaler.is_enabled():
                grad = grad / scaler.get_scale()
            gp = ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()
            loss_d = d_fake.float().mean() - d_real.float().mean() + lo.lambda_gp * gp
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
            scaler.update()
        for p in D.parameters():
            p.requires_grad_(False)
        with autocast():
            b_int, m = G_fwd(torch.cat([a, b]))
            x = torch.cat([a, b])
            b_prime = b_int * m + x * (1 - m)
            a_prime = a * m[:n] + b_int[:n] * (1 - m[:n])
            d_out = D(b_prime)
        mf = m.float().flatten(1)
        focus = (lo.lambda_fs * mf.mean(1) ** 2 + lo.lambda_fz * (1 / ((mf - 0.5).abs() + lo.focus_eps)).mean(1)).mean()
        loss_g = (-(d_out[:n].float().mean() + d_out[n:].float().mean())
                  + lo.lambda_rec * (a - a_prime.float()).abs().mean()
                  + lo.lambda_id * (b_int[n:].float() - b).abs().mean() + lo.lambda_f * focus)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        scaler.update()
        for p in D.parameters():
            p.requires_grad_(True)

    return step


def count_flops(step: Callable[[int], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(0)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_run(step: Callable[[int], None], iters: int, device: torch.device, start: int = 0) -> float:
    """Seconds per iteration over ``iters`` steps."""
    sync(device)
    t = time.perf_counter()
    for i in range(start, start + iters):
        step(i)
    sync(device)
    return (time.perf_counter() - t) / iters


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator (both sides)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=16, help="generator width (paper: 64)")
    p.add_argument("--res-blocks", type=int, default=3, help="generator residual blocks (paper: 6)")
    p.add_argument("--critic-width", type=int, default=32, help="critic width (paper: 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side, alternating")
    p.add_argument("--iters", type=int, default=5, help="iterations per timed run")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per side first")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s at this precision, for MFU (0: not printed)")
    args = p.parse_args(argv)

    cfg = make_config(args)
    toolkit, acc = toolkit_stepper(cfg)
    device = acc.device
    bare = bare_stepper(cfg, device)
    # Counted eagerly: the FLOPs are the model's, whatever compile fuses.
    flops = count_flops(bare_stepper(make_config(argparse.Namespace(**{**vars(args), "compile": False})), device))
    for i in range(args.warmup):
        toolkit(i), bare(i)
    times = {"toolkit": [], "bare": []}
    for r in range(args.repeats):
        start = args.warmup + r * args.iters
        times["toolkit"].append(time_run(toolkit, args.iters, device, start))
        times["bare"].append(time_run(bare, args.iters, device, start))

    images_per_iter = cfg.optim.n_critic * 2 * args.batch
    sec = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: images_per_iter / s for k, s in sec.items()}
    n_g = sum(q.numel() for q in build_generator(cfg.model, 1).parameters())
    n_d = sum(q.numel() for q in build_critic(cfg.model, 1, args.size).parameters())
    print(f"model: generator width {args.width}, {args.res_blocks} res blocks ({n_g / 1e6:.3f} M params); "
          f"critic width {args.critic_width} ({n_d / 1e6:.3f} M params)")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, {args.size} px, batch {args.batch}, "
          f"precision {args.precision}, channels_last {args.channels_last}, compile {args.compile}, "
          f"median of {args.repeats} alternating runs x {args.iters} iterations")
    print(f"FLOPs per iteration {flops / 1e9:.2f} GFLOP = {flops / args.batch / 1e9:.3f} GFLOP per image "
          f"(FlopCounterMode, {cfg.optim.n_critic} critic steps with GP + 1 generator step)")
    header = f"{'loop':<8} {'s/iter':>9} {'iter/s':>8} {'images/s':>9} {'TFLOP/s':>8}"
    if args.peak_tflops:
        header += f" {'MFU':>6}"
    print(header)
    for k in ("toolkit", "bare"):
        tf = flops / sec[k] / 1e12
        line = f"{k:<8} {sec[k]:>9.4f} {1 / sec[k]:>8.2f} {ips[k]:>9.1f} {tf:>8.3f}"
        if args.peak_tflops:
            line += f" {tf / args.peak_tflops:>6.1%}"
        print(line)
    ratio = ips["toolkit"] / ips["bare"]
    print(f"toolkit / bare = {ratio:.3f} (images/s; target >= 0.95)")
    return {"toolkit_images_per_s": ips["toolkit"], "bare_images_per_s": ips["bare"], "ratio": ratio,
            "flops_per_iter": flops, "sec_per_iter": sec}


if __name__ == "__main__":
    main()
