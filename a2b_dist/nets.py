"""A2B-GAN networks: the StarGAN generator without label input, and the StarGAN PatchGAN critic.

Layouts follow shared/DESIGN.md ("Model"). Two deliberate differences from the authors' code:
- InstanceNorm keeps no running statistics, so train() and eval() compute the same thing
  (the authors keep running stats and never call eval()).
- Upsampling and the mask activation are options (``upsample``, ``mask_activation``); the
  defaults are the paper's ConvTranspose and sigmoid.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), _norm(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _upsample(in_ch: int, out_ch: int, mode: str) -> nn.Module:
    if mode == "transpose":  # StarGAN: learnt, but prone to checkerboard patterns
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False)
    if mode in ("nearest", "bilinear"):  # resize, then convolve: no checkerboard by construction
        return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode),
                             nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False))
    raise ValueError(f"upsample={mode!r}; choose transpose, nearest or bilinear")


class Generator(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> (B_int (B, C, H, W) in [-1, 1], M (B, 1, H, W) in [0, 1])."""

    def __init__(self, channels: int = 1, width: int = 64, res_blocks: int = 6,
                 upsample: str = "transpose", mask_activation: str = "sigmoid", mask_prior: float = 0.0):
        super().__init__()
        if mask_activation not in ("sigmoid", "tanh"):
            raise ValueError(f"mask_activation={mask_activation!r}; choose sigmoid or tanh")
        if not 0.0 <= mask_prior < 1.0:
            raise ValueError(f"mask_prior={mask_prior!r}; choose 0 (off) or a value in (0, 1)")
        self.channels = channels
        self.mask_activation = mask_activation
        w = width
        layers: list[nn.Module] = [nn.Conv2d(channels, w, 7, 1, 3, bias=False), _norm(w), nn.ReLU(inplace=True)]
        for mult in (1, 2):  # two stride-2 downsamplings: w -> 2w -> 4w
            layers += [nn.Conv2d(w * mult, w * mult * 2, 4, 2, 1, bias=False), _norm(w * mult * 2),
                       nn.ReLU(inplace=True)]
        layers += [ResidualBlock(4 * w) for _ in range(res_blocks)]
        for mult in (4, 2):  # two x2 upsamplings: 4w -> 2w -> w
            layers += [_upsample(w * mult, w * mult // 2, upsample), _norm(w * mult // 2), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(w, channels + 1, 7, 1, 3, bias=False)]  # C image channels + 1 mask channel
        self.main = nn.Sequential(*layers)
        # mask_prior > 0: a learnt bias on the mask's logit, set so that M starts near mask_prior on
        # every pixel (the network's own logits start near 0, M near 0.5) and grows only where the
        # losses ask for it. The same bias for sigmoid and (tanh + 1) / 2, whose logit is half as steep.
        self.mask_bias = None
        if mask_prior > 0:
            # math, not torch: the networks may be built on the meta device (shapes only), where a
            # tensor has no value to read back
            logit = math.log(mask_prior / (1.0 - mask_prior))
            self.mask_bias = nn.Parameter(torch.full((), logit if mask_activation == "sigmoid" else logit / 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.main(x)                                    # (B, C+1, H, W)
        b_int = torch.tanh(out[:, : self.channels])          # intermediate healthy image
        logit = out[:, self.channels:]
        if self.mask_bias is not None:
            logit = logit + self.mask_bias.to(logit.dtype)
        if self.mask_activation == "sigmoid":
            mask = torch.sigmoid(logit)
        else:
            mask = (torch.tanh(logit) + 1) / 2
        return b_int, mask


def critic_depth(image_size: int, layers: int = 0) -> int:
    """Stride-2 convs in the critic: the given number, or 6 (StarGAN) capped so the patch map stays >= 2x2."""
    if layers:
        return layers
    return max(1, min(6, image_size.bit_length() - 2))   # 32 px -> 4, 64 -> 5, 128 and up -> 6


class Critic(nn.Module):
    """PatchGAN critic without normalisation (WGAN-GP): x (B, C, H, W) -> scores (B, 1, H/2^L, W/2^L).

    With ``domain_head`` it also classifies each patch's domain (StarGAN's auxiliary classifier, with
    the mixed set and the healthy set as the two domains): the output is then (B, 2, h, w), channel 0
    the critic's score, channel 1 the logit that the patch comes from the mixed set."""

    def __init__(self, channels: int = 1, image_size: int = 128, width: int = 64, layers: int = 0,
                 max_channels: int = 2048, domain_head: bool = False):
        super().__init__()
        depth = critic_depth(image_size, layers)
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.01)]
        ch = width
        for _ in range(depth - 1):
            nxt = min(ch * 2, max_channels)
            mods += [nn.Conv2d(ch, nxt, 4, 2, 1), nn.LeakyReLU(0.01)]
            ch = nxt
        self.main = nn.Sequential(*mods)
        self.head = nn.Conv2d(ch, 1, 3, 1, 1, bias=False)
        self.domain = nn.Conv2d(ch, 1, 3, 1, 1) if domain_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.main(x)
        if self.domain is None:
            return self.head(h)
        return torch.cat([self.head(h), self.domain(h)], 1)


def build_generator(model_cfg, channels: int) -> Generator:
    return Generator(channels, model_cfg.width, model_cfg.res_blocks, model_cfg.upsample,
                     model_cfg.mask_activation, model_cfg.mask_prior)


def build_critic(model_cfg, channels: int, image_size: int, domain_head: bool = False) -> Critic:
    return Critic(channels, image_size, model_cfg.critic_width, model_cfg.critic_layers,
                  domain_head=domain_head)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

