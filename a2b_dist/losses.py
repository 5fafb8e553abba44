"""A2B-GAN objective (paper Eq. 1-10) as pure functions on tensors, plus the anomaly map and score.

Shapes: images (B, C, H, W) in [-1, 1]; masks (B, 1, H, W) in [0, 1]; critic outputs (B, 1, h, w).
"""
from __future__ import annotations

from typing import Optional

import torch


def blend_healthy(x: torch.Tensor, b_int: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 1: B' = B_int * M + x * (1 - M)."""
    return b_int * mask + x * (1 - mask)


def blend_reconstruction(x: torch.Tensor, b_int: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: A' = x * M + B_int * (1 - M)."""
    return x * mask + b_int * (1 - mask)


def critic_wasserstein(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """Eq. 3: E[D(G(a))] - E[D(b)] (each critic output averaged over its patches, then the batch)."""
    return d_fake.float().mean() - d_real.float().mean()


def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x_hat = alpha * real + (1 - alpha) * fake, alpha (B, 1, 1, 1) drawn per sample."""
    return alpha * real + (1 - alpha) * fake


def gradient_penalty(d_hat: torch.Tensor, x_hat: torch.Tensor, loss_scale: Optional[torch.Tensor | float] = None
                     ) -> torch.Tensor:
    """Eq. 4's penalty E[(||grad_x_hat D(x_hat)||_2 - 1)^2], differentiable w.r.t. the critic's weights.

    ``x_hat`` must require grad and ``d_hat = D(x_hat)``. Under fp16 pass the GradScaler's scale as
    ``loss_scale``: the output is scaled before autograd.grad (so small gradients do not flush to zero)
    and the gradient unscaled out of place afterwards (the AMP "gradient penalty" recipe). The norm and
    penalty are computed in fp32 for every precision.
    """
    out = d_hat.float().sum()
    if loss_scale is not None:
        out = out * loss_scale
    (grad,) = torch.autograd.grad(out, x_hat, create_graph=True)
    grad = grad.float()
    if loss_scale is not None:
        grad = grad / loss_scale
    norm = grad.flatten(1).norm(2, dim=1)                 # (B,)
    return ((norm - 1) ** 2).mean()


def domain_loss(logits: torch.Tensor, mixed: bool) -> torch.Tensor:
    """Binary cross-entropy of a critic's domain logits (B, 1, h, w) against one domain for every
    patch: mixed (1) or healthy (0)."""
    logits = logits.float()
    target = torch.ones_like(logits) if mixed else torch.zeros_like(logits)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def generator_adversarial(d_fake_a: torch.Tensor, d_fake_b: torch.Tensor) -> torch.Tensor:
    """Eq. 5: -sum over x in {A, B} of E[D(G(x))]."""
    return -(d_fake_a.float().mean() + d_fake_b.float().mean())


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().mean()


def identity_loss(b_int_of_b: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 6: E_b ||G_int(b) - b||_1, on the intermediate image before the mask."""
    return l1(b_int_of_b, b)


def reconstruction_loss(a: torch.Tensor, a_prime: torch.Tensor) -> torch.Tensor:
    """Eq. 7: E_a ||a - A'||_1."""
    return l1(a, a_prime)


def focus_loss(mask: torch.Tensor, lambda_fs: float, lambda_fz: float, eps: float = 0.01,
               size: str = "image") -> torch.Tensor:
    """Eq. 8: lambda_fs * (mean M)^2 + lambda_fz * mean 1 / (|M - 0.5| + eps).

    ``size="image"`` squares each mask's mean and averages over the batch (a big mask on one
    anomalous image costs that image alone); ``size="batch"`` squares the mean over the whole batch,
    as the authors' code does. The 0/1 term is the same in both.
    """
    m = mask.float().flatten(1)                                            # (B, n)
    if size == "image":
        size_term = (m.mean(dim=1) ** 2).mean()
    elif size == "batch":
        size_term = m.mean() ** 2
    else:
        raise ValueError(f"focus size {size!r}; choose image or batch")
    zero_one = (1.0 / ((m - 0.5).abs() + eps)).mean()
    return lambda_fs * size_term + lambda_fz * zero_one


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay for the update after ``step`` earlier ones: min(decay, (1 + step) / (10 + step)).

    The ramp (0.1 at the first update, 0.5 after 8) keeps the average from being dominated by the
    first weights on a short schedule; the average is a = d * a + (1 - d) * w."""
    return min(decay, (1.0 + step) / (10.0 + step))


def focus_ramp(step: int, warmup_steps: int) -> float:
    """Weight of the focus loss at ``step``: 0 -> 1 linearly over ``warmup_steps`` (0: always 1).

    Council GAN switches its focus loss on late; a ramp lets the mask learn where to look before
    the loss pushes it to be small and binary.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def anomaly_map(x: torch.Tensor, b_prime: torch.Tensor) -> torch.Tensor:
    """Difference map |x - B'| averaged over channels: (B, C, H, W) -> (B, 1, H, W)."""
    return (x.float() - b_prime.float()).abs().mean(dim=1, keepdim=True)


SCORE_KINDS = ("mean", "topk", "mask", "smooth_topk", "intermediate", "healthy_z", "healthy_z_mask", "healthy_z_int")
# Kinds that read the maps standardised per pixel by healthy images' maps (healthy_map_norm's output).
NORM_KINDS = ("healthy_z", "healthy_z_mask", "healthy_z_int")
NORM_MAPS = 3     # |x - B'|, M * |x - B'|, |x - B_int|: the maps healthy_map_norm keeps statistics of


def standardise_map(diff: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """A map (B, 1, H, W) in units of healthy images' spread at each pixel: the positive part of
    (map - mean) / (sd + median(sd)), with ``mean`` and ``sd`` (H, W) the per-pixel mean and standard
    deviation of the same map over healthy images. The median keeps pixels where every healthy map
    is flat (background) from dividing by zero without a constant tied to the data's scale."""
    mean, sd = mean.to(diff.device, torch.float32), sd.to(diff.device, torch.float32)
    return ((diff.float() - mean) / (sd + sd.median())).clamp_min(0)


def map_moments(diff: torch.Tensor, mask: torch.Tensor, intermediate: torch.Tensor) -> torch.Tensor:
    """(3, 3, H, W) float64 sums for healthy_map_norm over a batch: for |x - B'|, M * |x - B'| and
    |x - B_int| (``intermediate``), the count, sum and sum of squares at each pixel."""
    out = []
    for m in (diff.double(), (diff * mask).double(), intermediate.double()):
        m = m[:, 0]
        out.append(torch.stack([torch.full_like(m[0], m.shape[0]), m.sum(0), (m * m).sum(0)]))
    return torch.stack(out)


def norm_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """(3, 2, H, W) float32: [map (|x - B'|, M * |x - B'|, |x - B_int|)][per-pixel mean, sd] from map_moments' sums."""
    n, s, ss = moments[:, 0], moments[:, 1], moments[:, 2]
    mean = s / n
    sd = (ss / n - mean * mean).clamp_min(0).sqrt()
    return torch.stack([mean, sd], 1).float()


def smoothing_kernel(image_size: int) -> int:
    """Side of the box filter of ``smooth_topk``: odd, about 1/16 of the image (3 px at 32 px, 17 at 256)."""
    return max(3, 2 * round(image_size / 32) + 1)


def anomaly_score(diff: torch.Tensor, kind: str = "mean", topk_percent: float = 5.0,
                  mask: Optional[torch.Tensor] = None,
                  intermediate: Optional[torch.Tensor] = None,
                  norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Image score from a difference map (B, 1, H, W) -> (B,).

    ``mean`` is the paper's score (section 3.3); ``topk`` is the mean of the largest topk_percent
    of the map's pixels, which favours small lesions over image-wide changes; ``smooth_topk`` is
    ``topk`` of the map box-filtered over about 1/16 of the image (single noisy pixels no longer
    decide); ``mask`` is the mean of M * |x - B'|, which counts only what the mask marks with
    confidence (needs ``mask``, (B, 1, H, W)); ``intermediate`` is the mean of |x - B_int|, the
    translation before the mask blends it in, so a mask that stays empty does not hide what the
    generator changed (needs ``intermediate``, the map ``anomaly_map(x, B_int)``).
    ``healthy_z`` is ``smooth_topk`` of the map standardised per pixel by healthy images' maps
    (standardise_map), so that what every healthy image shows at a place (an edge the translation
    always blurs) no longer counts; ``healthy_z_mask`` the same for M * |x - B'|, ``healthy_z_int``
    for |x - B_int| (each needs ``norm``, healthy_map_norm's (3, 2, H, W) statistics, and the mask or
    the intermediate map as its plain counterpart does).
    """
    if kind in NORM_KINDS:
        if norm is None:
            raise ValueError(f"score kind {kind!r} needs the healthy map statistics (norm)")
        if kind == "healthy_z_mask":
            if mask is None:
                raise ValueError("score kind 'healthy_z_mask' needs the mask")
            diff, stats = diff.float() * mask.float(), norm[1]
        elif kind == "healthy_z_int":
            if intermediate is None:
                raise ValueError("score kind 'healthy_z_int' needs the map |x - B_int|")
            diff, stats = intermediate, norm[2]
        else:
            stats = norm[0]
        return anomaly_score(standardise_map(diff, stats[0], stats[1]), "smooth_topk", topk_percent)
    flat = diff.float().flatten(1)
    if kind == "mean":
        return flat.mean(dim=1)
    if kind in ("topk", "smooth_topk"):
        if kind == "smooth_topk":
            k = smoothing_kernel(diff.shape[-1])
            flat = torch.nn.functional.avg_pool2d(diff.float(), k, stride=1, padding=k // 2,
                                                  count_include_pad=False).flatten(1)
        n = max(1, int(round(flat.shape[1] * topk_percent / 100.0)))
        return flat.topk(n, dim=1).values.mean(dim=1)
    if kind == "mask":
        if mask is None:
            raise ValueError("score kind 'mask' needs the mask")
        return (diff.float() * mask.float()).flatten(1).mean(dim=1)
    if kind == "intermediate":
        if intermediate is None:
            raise ValueError("score kind 'intermediate' needs the map |x - B_int|")
        return intermediate.float().flatten(1).mean(dim=1)
    raise ValueError(f"score kind {kind!r}; choose one of {', '.join(SCORE_KINDS)}")


def linear_decay_lr(base_lr: float, step: int, total_steps: int, decay_steps: int) -> float:
    """Paper section 4.4: constant, then linear decay to 0 over the last ``decay_steps`` steps.

    ``step`` counts completed steps (0 for the first update); the rate applied at step s is
    base * (total - s) / decay once s >= total - decay.
    """
    if decay_steps <= 0:
        return base_lr
    start = total_steps - decay_steps
    if step < start:
        return base_lr
    return base_lr * max(0.0, (total_steps - step) / decay_steps)


# ---------------------------------------------------------------------------------------------
# Levers that give the mask and the mixed set a job (issue 25; benchmarks/README.md runs 14-)

PATCH_SIDE = (0.1, 0.5)      # a foreign patch's side, per axis, relative to the image side
PATCH_EDGE = (0.0, 0.5)      # its soft edge, relative to its smaller half-side (0: a hard edge)
PATCH_ALPHA = (0.5, 1.0)     # how much of the donor replaces the original inside it (foreign-patch interpolation)
VISIBLE_CHANGE = 4.0 / 255.0  # in [-1, 1] units: two grey levels of an 8-bit image; smaller changes are no change


def _soft_box(centre: torch.Tensor, half: torch.Tensor, edge: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) profile along one axis: 1 well inside the box centre +- half, falling linearly to 0 over
    ``edge`` px (at least one pixel, so that a hard edge is anti-aliased) around its border."""
    t = torch.arange(n, device=centre.device, dtype=torch.float32).view(1, -1)
    inside = half.view(-1, 1) - (t - centre.view(-1, 1)).abs()                    # > 0 inside the box
    return ((inside + 0.5) / edge.clamp_min(1.0).view(-1, 1)).clamp(0, 1)


def foreign_patches(b: torch.Tensor, gen: torch.Generator, prob: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste into each healthy image, with probability ``prob``, a soft-edged rectangle taken from
    *another* image of the batch at another position (foreign-patch interpolation, Tan et al. 2020;
    the healthy-patch restoration of SAGAN, Zhang et al. 2024). No anomaly kind of any protocol is
    used: the patch is healthy anatomy in the wrong place.

    Returns ``(pasted, target, chosen)``: the images (equal to ``b`` outside each patch, and wholly
    for images not chosen), the mask target (B, 1, H, W) in [0, 1] (the patch's blend weight where
    the paste visibly changed the image, 0 elsewhere and on images not chosen), and the (B,) flags
    of the chosen images. Every draw comes from ``gen`` (checkpointed with the run)."""
    n, _, h, w = b.shape
    dev = gen.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen, device=dev)).to(b.device)

    chosen = (torch.rand(n, generator=gen, device=dev) < prob).to(b.device)
    if n < 2:
        chosen = torch.zeros_like(chosen)
    # The donor: another image of the batch (offset 1..n-1), shifted by a random (dy, dx).
    offset = torch.randint(1, max(2, n), (n,), generator=gen, device=dev).to(b.device)
    donor = ((torch.arange(n, device=b.device) + offset) % n).view(n, 1, 1)
    shift = torch.randint(0, max(h, w), (n, 2), generator=gen, device=dev).to(b.device)
    rows = (torch.arange(h, device=b.device).view(1, h) - shift[:, :1]) % h                  # a cyclic shift
    cols = (torch.arange(w, device=b.device).view(1, w) - shift[:, 1:]) % w
    donors = b[donor, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)       # (B, C, H, W)
    hy, hx = u(*PATCH_SIDE, n) * h / 2, u(*PATCH_SIDE, n) * w / 2
    cy, cx = u(0, 1, n) * (h - 1), u(0, 1, n) * (w - 1)
    edge = u(*PATCH_EDGE, n) * torch.minimum(hy, hx)
    alpha = u(*PATCH_ALPHA, n)
    shape = _soft_box(cy, hy, edge, h)[:, :, None] * _soft_box(cx, hx, edge, w)[:, None, :]   # (B, H, W)
    weight = (shape * alpha.view(-1, 1, 1) * chosen.view(-1, 1, 1)).unsqueeze(1).to(b.dtype)  # (B, 1, H, W)
    pasted = b * (1 - weight) + donors * weight
    visible = ((pasted - b).abs().amax(dim=1, keepdim=True) >= VISIBLE_CHANGE).to(weight.dtype)
    return pasted, (weight * visible).float(), chosen


def mask_supervision(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the mask against a soft target (B, 1, H, W), in fp32."""
    m = mask.float().clamp(1e-6, 1 - 1e-6)
    return torch.nn.functional.binary_cross_entropy(m, target.float())


def pu_mask_loss(mask_mixed: torch.Tensor, mask_healthy: torch.Tensor, weight: float,
                 topk_percent: float = 0.0) -> torch.Tensor:
    """The mask as a positive-unlabelled classifier: binary cross-entropy towards 0 on healthy images,
    plus ``weight`` x cross-entropy towards 1 on mixed images. Content that both sets share settles
    where the two pulls balance (M near weight x r / (1 + weight x r), r the mixed set's share of such
    content against the healthy set's: about ``weight``); content that only the mixed set has (its
    anomalies) meets only the pull towards 1. A classifier of unlabelled against labelled data ranks
    as the true one does (Elkan and Noto, 2008), so ``weight`` sets how large M is on healthy
    content, not where it is large.

    ``topk_percent`` 0: every pixel is an example. Else each image is one example, its M the mean of
    its top ``topk_percent``% pixels (multiple-instance pooling): the pull lands on the few pixels
    where a mixed image's mask is highest, the anomalies once the mask finds them, instead of being
    spread over the whole image. fp32."""
    def pooled(m: torch.Tensor) -> torch.Tensor:
        m = m.float().flatten(1)
        if topk_percent > 0:
            k = max(1, int(round(m.shape[1] * topk_percent / 100.0)))
            m = m.topk(k, dim=1).values.mean(1)
        return m.clamp(1e-6, 1 - 1e-6)

    return -torch.log1p(-pooled(mask_healthy)).mean() - weight * torch.log(pooled(mask_mixed)).mean()


def lowest_scored(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * B) lowest of (B,) ``scores``: the mixed images the current
    model finds most healthy (ties broken by position, so the choice is deterministic)."""
    k = int(round(fraction * scores.shape[0]))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.sort(scores.detach().float(), stable=True).indices[:k]
