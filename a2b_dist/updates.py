"""The networks as trained (``Models``), the generator's moving average, and the two update phases
of a step (``A2BUpdates``: critic, then generator). The maths lives in a2b_dist.losses; this holds
who calls what. A backend (a2b_dist.backends) builds the Models and picks the phases' class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from a2b_dist import losses as L
from a2b_dist.config import Config
from a2b_dist.nets import build_critic, build_generator


def build_networks(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Generator and critic with identical initial weights on every rank (seeded by train.seed)."""
    torch.manual_seed(cfg.train.seed)
    G = build_generator(cfg.model, cfg.data.channels)
    D = build_critic(cfg.model, cfg.data.channels, cfg.data.image_size, domain_head=cfg.loss.lambda_cls > 0)
    # The DDP set-up (no broadcast of buffers) assumes buffer-free networks: InstanceNorm keeps no
    # running statistics.
    assert not list(G.buffers()) and not list(D.buffers()), "DDP set-up assumes buffer-free networks"
    if cfg.train.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    return G, D


def requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


@dataclass
class Models:
    """The two networks as created (``G``, ``D``: canonical state_dicts) and as trained (DDP-wrapped,
    or DeepSpeed engines whose optimizers are the engines' own), and the generator's moving average
    (``G_ema``, when train.ema_decay > 0)."""
    G: torch.nn.Module
    D: torch.nn.Module
    G_train: torch.nn.Module
    D_train: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    G_ema: Optional[torch.optim.swa_utils.AveragedModel] = None

    @property
    def G_eval(self) -> torch.nn.Module:
        """The generator that selection, samples and export use: the average when kept."""
        return self.G_ema.module if self.G_ema is not None else self.G


def make_ema(G: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """stylegan2-ada's G_ema through torch's AveragedModel: the first update copies G, update k >= 1
    computes a = d * a + (1 - d) * w with d = losses.ema_decay_at(k, decay)."""
    from torch.optim.swa_utils import AveragedModel

    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = L.ema_decay_at(int(n_averaged), decay)
        for a, w in zip(averaged, current):
            a.mul_(d).add_(w, alpha=1.0 - d)

    ema = AveragedModel(G, multi_avg_fn=ema_update)
    ema.requires_grad_(False)
    return ema


class A2BUpdates:
    """The two phases of a step: ``critic_update`` (Eq. 4) and ``generator_update`` (Eq. 10).

    DDP rules (shared/DESIGN.md): one forward of the wrapped critic per critic update (real, fake and
    interpolates in one batch), the gradient penalty through autograd.grad and one ordinary backward;
    the generator never runs its DDP wrapper in a critic update, and the critic runs unwrapped and
    frozen in a generator update, so DDP never all-reduces critic gradients there.
    """

    def __init__(self, cfg: Config, models: Models, accelerator, gp_generator: torch.Generator):
        self.cfg, self.m, self.acc, self.gp_gen = cfg, models, accelerator, gp_generator
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def _scale(self) -> Optional[torch.Tensor]:
        scaler = self.acc.scaler
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def critic_loss(self, a: torch.Tensor, b: torch.Tensor, alpha: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), self.acc.autocast():
            b_int, mask = self.m.G(a)                        # unwrapped: no DDP forward
            fake = L.blend_healthy(a, b_int, mask).float()  # Eq. 1: B' of the mixed images
        k = round(self.cfg.loss.critic_mixed * a.shape[0])
        if k:                                               # the mixed images themselves as fakes
            fake = torch.cat([a[:k].float(), fake[k:]])
        if alpha is None:
            alpha = torch.rand(a.shape[0], 1, 1, 1, generator=self.gp_gen, device=self.gp_gen.device)
        alpha = alpha.to(a.device)
        x_hat = L.interpolate(b, fake, alpha).detach().requires_grad_(True)
        lambda_cls = self.cfg.loss.lambda_cls
        with self.acc.autocast():
            d_real, d_fake, d_hat, *d_mixed = self.critic_outputs(b, fake, x_hat, a if lambda_cls else None)
        wasserstein = L.critic_wasserstein(d_fake[:, :1], d_real[:, :1])    # Eq. 3
        gp = L.gradient_penalty(d_hat[:, :1], x_hat, self._scale())          # Eq. 4's penalty
        loss = wasserstein + self.cfg.loss.lambda_gp * gp                    # Eq. 4 = Eq. 9
        cls = torch.zeros((), device=a.device)
        if lambda_cls:       # StarGAN's classification of real images: mixed 1, healthy 0, per patch
            cls = (L.domain_loss(d_mixed[0][:, 1:], True) + L.domain_loss(d_real[:, 1:], False)) / 2
            loss = loss + lambda_cls * cls
        return loss, {"loss_d": loss.detach(), "wasserstein": wasserstein.detach(), "gp": gp.detach(),
                      "cls_d": cls.detach()}

    def critic_outputs(self, b: torch.Tensor, fake: torch.Tensor, x_hat: torch.Tensor,
                       a: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """D(b), D(fake), D(x_hat) (and D(a) when the mixed images are given) from one forward of the
        wrapped critic."""
        parts = [b, fake, x_hat] + ([a.float()] if a is not None else [])
        out = self.m.D_train(torch.cat(parts).contiguous(memory_format=self.memory_format))
        return out.split(b.shape[0])

    def apply(self, loss: torch.Tensor, trained: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        """Backward of ``loss`` and one step of ``opt``; ``trained`` is the network's wrapper (DDP here,
        unused; a DeepSpeed engine, which steps itself, in DeepSpeedUpdates)."""
        opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        opt.step()

    def critic_update(self, a: torch.Tensor, b: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> dict:
        loss, stats = self.critic_loss(a, b, alpha)
        self.apply(loss, self.m.D_train, self.m.opt_d)
        return stats

    def generator_loss(self, a: torch.Tensor, b: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg.loss
        n = a.shape[0]
        zero = torch.zeros((), device=a.device)
        # Synthetic restoration: the generator sees healthy images with foreign patches, and every
        # healthy term below asks for the original image back.
        b_in, target = b, None
        if cfg.restore_prob > 0:
            b_in, target, _ = L.foreign_patches(b, self.gp_gen, cfg.restore_prob)
        with self.acc.autocast():
            b_int, mask = self.m.G_train(torch.cat([a, b_in]).contiguous(memory_format=self.memory_format))
            b_int_a, b_int_b = b_int.split(n)
            m_a, m_b = mask.split(n)
            b_prime_a = L.blend_healthy(a, b_int_a, m_a)                       # Eq. 1
            b_prime_b = L.blend_healthy(b_in, b_int_b, m_b)
            a_prime = L.blend_reconstruction(a, b_int_a, m_a)                 # Eq. 2
            d_a, d_b = self.m.D(torch.cat([b_prime_a, b_prime_b])).split(n)   # unwrapped, frozen critic
        adv = L.generator_adversarial(d_a[:, :1], d_b[:, :1])                  # Eq. 5
        rec = L.reconstruction_loss(a, a_prime)                                # Eq. 7
        idt = L.identity_loss(b_int_b, b)                                      # Eq. 6
        idt_out = L.l1(b_prime_b, b)          # Fixed-Point GAN: a healthy image translates to itself
        ramp = L.focus_ramp(step, cfg.focus_warmup_steps)
        size_ramp = 1.0 if cfg.focus_warmup_terms == "zero_one" else ramp   # zero_one: size term from step 0
        focus = L.focus_loss(mask, cfg.lambda_fs * size_ramp, cfg.lambda_fz * ramp, cfg.focus_eps,
                             cfg.focus_size)                                   # Eq. 8
        loss = adv + cfg.lambda_rec * rec + cfg.lambda_id * idt + cfg.lambda_f * focus  # Eq. 10
        if cfg.lambda_id_out:
            loss = loss + cfg.lambda_id_out * idt_out
        mask_sup = zero
        if target is not None:
            mask_sup = L.mask_supervision(m_b, target)
            loss = loss + cfg.lambda_mask * mask_sup
        pu = zero
        if cfg.pu_mask > 0:
            pu = L.pu_mask_loss(m_a, m_b, cfg.pu_mask, cfg.pu_topk)
            loss = loss + cfg.lambda_mask * pu
        cls = zero
        if cfg.lambda_cls:              # StarGAN's classification of fakes: B' of a mixed image is healthy
            cls = L.domain_loss(d_a[:, 1:], False)
            loss = loss + cfg.lambda_cls * cls
        pseudo = zero
        if cfg.pseudo_fraction > 0 and step >= cfg.pseudo_after * self.cfg.train.steps:
            low = L.lowest_scored(L.anomaly_map(a, b_prime_a).flatten(1).mean(1), cfg.pseudo_fraction)
            if len(low):
                pseudo = (cfg.lambda_id * L.l1(b_int_a[low], a[low])
                          + cfg.lambda_id_out * L.l1(b_prime_a[low], a[low]))
                loss = loss + pseudo
        return loss, {"loss_g": loss.detach(), "adv_g": adv.detach(), "rec": rec.detach(),
                      "idt": idt.detach(), "idt_out": idt_out.detach(), "focus": focus.detach(),
                      "mask_sup": mask_sup.detach(), "pseudo": pseudo.detach(), "cls": cls.detach(), "pu": pu.detach()}

    def generator_update(self, a: torch.Tensor, b: torch.Tensor, step: int) -> dict:
        requires_grad(self.m.D, False)
        try:
            loss, stats = self.generator_loss(a, b, step)
            self.apply(loss, self.m.G_train, self.m.opt_g)
        finally:
            requires_grad(self.m.D, True)
        if self.m.G_ema is not None:
            self.m.G_ema.update_parameters(self.m.G)
        return stats


