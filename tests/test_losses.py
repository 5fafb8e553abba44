"""Each loss term of Eq. 1-10 against a hand computation on small tensors."""
import math

import pytest
import torch

from a2b_dist import losses as L


def test_blends_eq1_eq2():
    x = torch.tensor([[[[1.0, -1.0]]]])
    b_int = torch.tensor([[[[0.0, 0.5]]]])
    m = torch.tensor([[[[0.25, 1.0]]]])
    # Eq. 1: B' = B_int*M + x*(1-M) = [0*0.25 + 1*0.75, 0.5*1 + (-1)*0]
    assert torch.allclose(L.blend_healthy(x, b_int, m), torch.tensor([[[[0.75, 0.5]]]]))
    # Eq. 2: A' = x*M + B_int*(1-M) = [1*0.25 + 0*0.75, -1*1 + 0.5*0]
    assert torch.allclose(L.blend_reconstruction(x, b_int, m), torch.tensor([[[[0.25, -1.0]]]]))


def test_critic_and_generator_adversarial_eq3_eq5():
    d_fake = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])   # mean 4
    d_real = torch.tensor([[[[2.0]]], [[[0.0]]]])              # mean 1
    assert L.critic_wasserstein(d_fake, d_real).item() == pytest.approx(3.0)
    assert L.generator_adversarial(d_fake, d_real).item() == pytest.approx(-5.0)


def test_identity_and_reconstruction_l1_eq6_eq7():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    assert L.identity_loss(b, a).item() == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert L.reconstruction_loss(a, b).item() == pytest.approx(0.625)


def test_focus_loss_eq8_by_hand():
    m = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    fs, fz, eps = 2.0, 0.5, 0.01
    # image 1: mean 0.5 -> size 0.25; 1/(|M-0.5|+eps) = 1/0.51, 1/0.51, 1/0.01, 1/0.01
    z1 = (2 / 0.51 + 2 / 0.01) / 4
    # image 2: mean 1 -> size 1; all 1/0.51
    z2 = 1 / 0.51
    expected = ((fs * 0.25 + fz * z1) + (fs * 1.0 + fz * z2)) / 2
    assert L.focus_loss(m, fs, fz, eps).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_penalty_linear_critic_has_known_norm():
    # D(x) = sum(w * x): grad wrt x is w everywhere, norm ||w||; penalty (||w|| - 1)^2.
    w = torch.tensor([[[[3.0, 4.0]]]])
    x_hat = torch.randn(5, 1, 1, 2, requires_grad=True)
    d_hat = (x_hat * w).sum(dim=(1, 2, 3))
    gp = L.gradient_penalty(d_hat, x_hat)
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_penalty_under_precisions(dtype):
    """A small conv critic under autocast (bf16/fp16 on CPU) matches the fp32 penalty; the fp16 path
    with a large loss scale (the AMP recipe) gives the same value as without it."""
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, 1, 1), torch.nn.LeakyReLU(0.01),
                                 torch.nn.Conv2d(4, 1, 3, 1, 1))
    x = torch.randn(3, 1, 8, 8)

    def penalty(autocast_dtype, scale=None):
        x_hat = x.clone().requires_grad_(True)
        ctx = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not torch.float32
               else torch.autocast("cpu", enabled=False))
        with ctx:
            d = critic(x_hat)
        return L.gradient_penalty(d, x_hat, scale)

    ref = penalty(torch.float32).item()
    got = penalty(dtype).item()
    tol = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert got == pytest.approx(ref, rel=tol, abs=tol)
    if dtype is torch.float16:
        scaled = penalty(dtype, scale=torch.tensor(2.0 ** 10)).item()
        assert scaled == pytest.approx(got, rel=1e-3)
        assert math.isfinite(scaled)
        # Too large a scale overflows fp16 to inf/nan: GradScaler then skips the step and lowers
        # the scale, which is why the trainer tolerates short runs of such steps under fp16.
        assert not math.isfinite(penalty(dtype, scale=torch.tensor(2.0 ** 24)).item())


def test_gradient_penalty_is_differentiable_wrt_critic_weights():
    critic = torch.nn.Conv2d(1, 1, 3, 1, 1, bias=False)
    x_hat = torch.randn(2, 1, 4, 4, requires_grad=True)
    gp = L.gradient_penalty(critic(x_hat), x_hat)
    gp.backward()
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0


def test_anomaly_map_and_scores():
    x = torch.zeros(2, 3, 2, 2)
    bp = torch.zeros(2, 3, 2, 2)
    bp[0, :, 0, 0] = 1.0         # one pixel differs by 1 in every channel
    bp[1, 0] = 0.3               # channel 0 differs by 0.3 everywhere
    diff = L.anomaly_map(x, bp)
    assert diff.shape == (2, 1, 2, 2)
    assert torch.allclose(diff[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(diff[1], torch.full((1, 2, 2), 0.1))
    assert torch.allclose(L.anomaly_score(diff), torch.tensor([0.25, 0.1]))
    assert torch.allclose(L.anomaly_score(diff, "topk", 25.0), torch.tensor([1.0, 0.1]))


def test_linear_decay_schedule():
    assert L.linear_decay_lr(1e-4, 0, 10, 4) == 1e-4
    assert L.linear_decay_lr(1e-4, 5, 10, 4) == 1e-4
    assert L.linear_decay_lr(1e-4, 6, 10, 4) == pytest.approx(1e-4)
    assert L.linear_decay_lr(1e-4, 8, 10, 4) == pytest.approx(0.5e-4)
    assert L.linear_decay_lr(1e-4, 9, 10, 4) == pytest.approx(0.25e-4)
    assert L.linear_decay_lr(1e-4, 3, 10, 0) == 1e-4


def test_focus_ramp():
    assert L.focus_ramp(0, 0) == 1.0 and L.focus_ramp(5, 0) == 1.0
    assert L.focus_ramp(0, 100) == 0.0
    assert L.focus_ramp(25, 100) == 0.25
    assert L.focus_ramp(100, 100) == 1.0 and L.focus_ramp(500, 100) == 1.0


@pytest.mark.parametrize("terms", ["both", "zero_one"])
def test_focus_warmup_terms_in_generator_loss(terms):
    """At step 0 of a warm-up, `both` drops the whole focus loss; `zero_one` keeps the size term."""
    from a2b_dist.config import load_config
    from a2b_dist.steps import build_models, make_accelerator
    from a2b_dist.updates import A2BUpdates

    cfg = load_config("configs/test.yaml", ["loss.focus_warmup_steps=100", f"loss.focus_warmup_terms={terms}",
                                            "loss.lambda_fs=3", "train.batch_size=2"])
    acc = make_accelerator(cfg)
    models = build_models(cfg, acc)
    updates = A2BUpdates(cfg, models, acc, torch.Generator())
    g = torch.Generator().manual_seed(0)
    size, c = cfg.data.image_size, cfg.data.channels
    a, b = (torch.rand(2, c, size, size, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        loss, stats = updates.generator_loss(a, b, step=0)
        _, mask = models.G(torch.cat([a, b]))
    lo = cfg.loss
    rest = stats["adv_g"] + lo.lambda_rec * stats["rec"] + lo.lambda_id * stats["idt"]
    size_term = lo.lambda_f * lo.lambda_fs * (mask.flatten(1).mean(1) ** 2).mean()
    expected = rest + (size_term if terms == "zero_one" else 0.0)
    assert size_term > 1e-3                      # the case tells the two settings apart
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_focus_size_per_image_and_over_the_batch_by_hand():
    m = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])   # (2, 1, 2, 2)
    zero_one = 1.0 / (0.5 + 0.1)                                                   # every pixel
    # per image: (1^2 + 0^2) / 2 = 0.5; over the batch: (mean 0.5)^2 = 0.25
    assert L.focus_loss(m, 2.0, 1.0, 0.1, "image").item() == pytest.approx(2.0 * 0.5 + zero_one)
    assert L.focus_loss(m, 2.0, 1.0, 0.1, "batch").item() == pytest.approx(2.0 * 0.25 + zero_one)
    with pytest.raises(ValueError, match="image or batch"):
        L.focus_loss(m, 1.0, 1.0, 0.1, "pixel")


def test_mask_and_smoothed_topk_scores_by_hand():
    diff = torch.zeros(1, 1, 32, 32)
    diff[0, 0, 10, 10] = 9.0                       # one hot pixel
    mask = torch.zeros(1, 1, 32, 32)
    mask[0, 0, 10, 10] = 0.5
    assert L.anomaly_score(diff, "mask", mask=mask).item() == pytest.approx(4.5 / 1024)
    # 32 px -> a 3x3 box: the hot pixel spreads to 9 pixels of value 1; top 1% = 10 pixels -> 9/10
    assert L.smoothing_kernel(32) == 3 and L.smoothing_kernel(256) == 17
    assert L.anomaly_score(diff, "smooth_topk", 1.0).item() == pytest.approx(0.9)
    assert L.anomaly_score(diff, "topk", 1.0).item() == pytest.approx(0.9)   # unsmoothed: 9 of 10 pixels
    diff[0, 0, 20, 20] = 9.0                       # a second hot pixel far away: unsmoothed top 1% doubles,
    assert L.anomaly_score(diff, "topk", 1.0).item() == pytest.approx(1.8)
    assert L.anomaly_score(diff, "smooth_topk", 1.0).item() == pytest.approx(1.0)   # smoothed: 10 of 18 ones
    with pytest.raises(ValueError, match="needs the mask"):
        L.anomaly_score(diff, "mask")


def test_intermediate_score_sees_what_an_empty_mask_hides():
    x = torch.zeros(2, 1, 4, 4)
    b_int = torch.zeros(2, 1, 4, 4)
    b_int[1, 0, :2, :2] = 1.0                      # the generator changed a quarter of image 1
    m = torch.zeros(2, 1, 4, 4)                    # ... but the mask blends none of it in
    diff = L.anomaly_map(x, L.blend_healthy(x, b_int, m))
    assert L.anomaly_score(diff).tolist() == [0.0, 0.0]
    got = L.anomaly_score(diff, "intermediate", intermediate=L.anomaly_map(x, b_int))
    assert got.tolist() == [0.0, 0.25]
    with pytest.raises(ValueError, match="B_int"):
        L.anomaly_score(diff, "intermediate")


def test_ema_decay_ramp():
    assert L.ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert L.ema_decay_at(8, 0.999) == pytest.approx(0.5)
    assert L.ema_decay_at(10**6, 0.999) == 0.999


def _updates(overrides):
    from a2b_dist.config import load_config
    from a2b_dist.steps import build_models, make_accelerator
    from a2b_dist.updates import A2BUpdates

    cfg = load_config("configs/test.yaml", ["train.batch_size=2", *overrides])
    acc = make_accelerator(cfg)
    models = build_models(cfg, acc)
    g = torch.Generator().manual_seed(0)
    size, c = cfg.data.image_size, cfg.data.channels
    a, b = (torch.rand(2, c, size, size, generator=g) * 2 - 1 for _ in range(2))
    return cfg, models, A2BUpdates(cfg, models, acc, torch.Generator()), a, b


def test_output_identity_term_by_hand():
    """lambda_id_out adds lambda * L1(B'(b), b) for the healthy batch to Eq. 10, nothing else."""
    cfg, models, updates, a, b = _updates(["loss.lambda_id_out=2.5"])
    with torch.no_grad():
        loss, stats = updates.generator_loss(a, b, step=0)
        b_int, m = models.G(b)
        by_hand = (L.blend_healthy(b, b_int, m) - b).abs().mean()
    lo = cfg.loss
    paper = (stats["adv_g"] + lo.lambda_rec * stats["rec"] + lo.lambda_id * stats["idt"]
             + lo.lambda_f * stats["focus"])
    assert stats["idt_out"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert by_hand > 1e-3
    assert loss.item() == pytest.approx((paper + 2.5 * by_hand).item(), rel=1e-5, abs=1e-6)
    _, _, off, _, _ = _updates([])
    with torch.no_grad():
        loss0, stats0 = off.generator_loss(a, b, step=0)
    assert loss0.item() == pytest.approx((stats0["adv_g"] + lo.lambda_rec * stats0["rec"] + lo.lambda_id
                                          * stats0["idt"] + lo.lambda_f * stats0["focus"]).item(), rel=1e-5)


def test_ema_equals_a_hand_computed_average():
    decay = 0.9
    _, models, updates, a, b = _updates([f"train.ema_decay={decay}"])
    seen, expected = [], None
    for k in range(4):
        updates.generator_update(a, b, step=k)
        w = {n: p.detach().clone() for n, p in models.G.named_parameters()}
        seen.append(w)
        if k == 0:
            expected = {n: t.clone() for n, t in w.items()}        # the first update copies G
        else:
            d = min(decay, (1 + k) / (10 + k))
            expected = {n: d * expected[n] + (1 - d) * w[n] for n in w}
    assert not torch.equal(seen[0]["main.0.weight"], seen[-1]["main.0.weight"])   # G did move
    averaged = dict(models.G_ema.module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(averaged["main.0.weight"], seen[-1]["main.0.weight"])
    assert models.G_eval is models.G_ema.module


def test_map_moments_give_the_per_pixel_mean_and_spread_of_healthy_maps():
    """healthy_map_norm's statistics, summed batch by batch, equal the mean and (population)
    standard deviation at each pixel of |x - B'|, M * |x - B'| and |x - B_int| over all the images."""
    g = torch.Generator().manual_seed(0)
    diff, mask, inter = (torch.rand(10, 1, 6, 5, generator=g) for _ in range(3))
    moments = L.map_moments(diff[:4], mask[:4], inter[:4]) + L.map_moments(diff[4:], mask[4:], inter[4:])
    norm = L.norm_from_moments(moments)
    assert norm.shape == (L.NORM_MAPS, 2, 6, 5)
    for i, m in enumerate((diff, diff * mask, inter)):
        torch.testing.assert_close(norm[i, 0], m[:, 0].mean(0))
        torch.testing.assert_close(norm[i, 1], m[:, 0].std(0, unbiased=False))


def test_healthy_z_discounts_what_every_healthy_map_shows():
    """A map equal to the healthy mean scores 0; the same bump scores higher where healthy maps are
    quiet than where they always vary (an edge the translation blurs); the mask kind weighs by M,
    the intermediate kind reads |x - B_int| with its own statistics."""
    mean = torch.zeros(16, 16)
    mean[:, :4] = 0.5                       # healthy maps are high and vary on the left edge
    sd = torch.full((16, 16), 0.01)
    sd[:, :4] = 0.2
    norm = torch.stack([torch.stack([mean, sd])] * L.NORM_MAPS)
    quiet, edge = mean.clone()[None, None], mean.clone()[None, None]
    quiet[..., 8:11, 8:11] += 0.3
    edge[..., 8:11, 0:3] += 0.3
    maps = torch.cat([mean[None, None], quiet, edge])
    z = L.anomaly_score(maps, "healthy_z", 5.0, norm=norm)
    assert z[0] == 0 and z[1] > 5 * z[2] > 0
    ones, zeros = torch.ones_like(maps), torch.zeros_like(maps)
    assert torch.equal(L.anomaly_score(maps, "healthy_z_mask", 5.0, ones, norm=norm), z)
    assert torch.all(L.anomaly_score(maps, "healthy_z_mask", 5.0, zeros, norm=norm) == 0)
    assert torch.equal(L.anomaly_score(zeros, "healthy_z_int", 5.0, intermediate=maps, norm=norm), z)
    with pytest.raises(ValueError, match="healthy map statistics"):
        L.anomaly_score(maps, "healthy_z")
    with pytest.raises(ValueError, match="B_int"):
        L.anomaly_score(maps, "healthy_z_int", norm=norm)
