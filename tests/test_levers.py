"""The quality levers of issue 25 against hand computations: the synthetic restoration (a foreign
healthy patch, restored to the original, the mask supervised with where it lies) and the mixed set
ranked by the model (the lowest-scored share taking the identity terms), and the mask trained as a
positive-unlabelled classifier of mixed against healthy images."""
import pytest
import torch

from a2b_dist import losses as L


def _batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # distinct images with structure (so that a shifted donor differs from the original)
    base = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(base, 3, 1, 1)


def test_foreign_patch_changes_only_its_region_and_targets_it():
    b = _batch()
    pasted, target, chosen = L.foreign_patches(b, torch.Generator().manual_seed(3), prob=0.5)
    assert pasted.shape == b.shape and target.shape == (8, 1, 32, 32)
    assert 0 < int(chosen.sum()) < 8                                 # some chosen, some not
    changed = (pasted - b).abs() > 0
    for i in range(8):
        if not chosen[i]:
            assert torch.equal(pasted[i], b[i]) and target[i].max() == 0   # untouched, target empty
            continue
        # only pixels inside the patch change; the target covers what changed visibly
        inside = target[i] > 0
        assert changed[i].any()
        assert not (changed[i] & ~inside & ((pasted[i] - b[i]).abs() >= L.VISIBLE_CHANGE)).any()
        assert inside.float().mean() < 0.3                          # a patch, not the image
        assert target[i].max() <= 1.0
    # the same generator state gives the same patches (the run's seed decides them)
    again, t2, c2 = L.foreign_patches(b, torch.Generator().manual_seed(3), prob=0.5)
    assert torch.equal(again, pasted) and torch.equal(t2, target) and torch.equal(c2, chosen)


def test_foreign_patch_comes_from_another_image():
    """Two flat images, -1 and +1: each patch carries the other image's value; a batch of one
    image, or a uniform batch, has nothing foreign to paste."""
    b = torch.cat([torch.full((1, 1, 32, 32), -1.0), torch.full((1, 1, 32, 32), 1.0)])
    pasted, target, chosen = L.foreign_patches(b, torch.Generator().manual_seed(0), prob=1.0)
    assert bool(chosen.all())
    for i, own in ((0, -1.0), (1, 1.0)):
        inside = target[i, 0] > 0
        assert inside.any()
        moved = (pasted[i, 0] - own) * -own                         # towards the other image's value
        assert (moved[inside] > 0).all() and moved.max() >= 0.99   # alpha >= 0.5 of a 2.0 step
        assert (moved[~inside] == 0).all()
    flat = torch.full((4, 1, 32, 32), 0.3)
    p2, t2, _ = L.foreign_patches(flat, torch.Generator().manual_seed(0), prob=1.0)
    assert torch.allclose(p2, flat) and t2.max() == 0
    p1, t1, c1 = L.foreign_patches(b[:1], torch.Generator().manual_seed(0), prob=1.0)
    assert not c1.any() and torch.equal(p1, b[:1])


def _paper_terms(stats, lo):
    """Eq. 10's terms and the output identity from a generator update's stats, weighted as the loss
    weighs them: what a lever's term is added to."""
    return (stats["adv_g"] + lo.lambda_rec * stats["rec"] + lo.lambda_id * stats["idt"]
            + lo.lambda_f * stats["focus"] + lo.lambda_id_out * stats["idt_out"])


def _updates(overrides, n=4):
    from a2b_dist.config import load_config
    from a2b_dist.steps import build_models, make_accelerator
    from a2b_dist.updates import A2BUpdates

    cfg = load_config("configs/test.yaml", [f"train.batch_size={n}", *overrides])
    acc = make_accelerator(cfg)
    models = build_models(cfg, acc)
    g = torch.Generator().manual_seed(0)
    size, c = cfg.data.image_size, cfg.data.channels
    a, b = (torch.nn.functional.avg_pool2d(torch.rand(n, c, size, size, generator=g) * 2 - 1, 3, 1, 1)
            for _ in range(2))
    return cfg, models, A2BUpdates(cfg, models, acc, torch.Generator().manual_seed(5)), a, b


def test_restoration_targets_the_original_and_supervises_the_mask():
    cfg, models, updates, a, b = _updates(["loss.restore_prob=1.0", "loss.lambda_mask=2.0",
                                           "loss.lambda_id_out=3.0"])
    pasted, target, chosen = L.foreign_patches(b, torch.Generator().manual_seed(5), 1.0)
    assert bool(chosen.all()) and not torch.equal(pasted, b)
    with torch.no_grad():
        loss, stats = updates.generator_loss(a, b, step=0)
        b_int, m = models.G(pasted)                                 # G sees the pasted images ...
        idt = (b_int - b).abs().mean()                              # ... and is asked for the originals
        idt_out = (L.blend_healthy(pasted, b_int, m) - b).abs().mean()
        sup = torch.nn.functional.binary_cross_entropy(m.clamp(1e-6, 1 - 1e-6), target)
    assert stats["idt"].item() == pytest.approx(idt.item(), rel=1e-5)
    assert stats["idt_out"].item() == pytest.approx(idt_out.item(), rel=1e-5)
    assert stats["mask_sup"].item() == pytest.approx(sup.item(), rel=1e-5)
    lo = cfg.loss
    by_hand = (stats["adv_g"] + lo.lambda_rec * stats["rec"] + lo.lambda_id * idt + lo.lambda_f * stats["focus"]
               + 3.0 * idt_out + 2.0 * sup)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # off (the default): G sees b itself and no mask term
    _, models0, off, a0, b0 = _updates([])
    with torch.no_grad():
        _, stats0 = off.generator_loss(a0, b0, step=0)
        b_int0, _ = models0.G(b0)
    assert stats0["idt"].item() == pytest.approx((b_int0 - b0).abs().mean().item(), rel=1e-5)
    assert stats0["mask_sup"].item() == 0


def test_lowest_scored_honours_the_fraction():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4])
    for q, expected in ((0.25, {1, 5}), (0.5, {1, 5, 3, 7}), (0.0, set()), (1.0, set(range(8)))):
        assert set(L.lowest_scored(scores, q).tolist()) == expected
    assert len(L.lowest_scored(torch.rand(16), 0.3)) == 5          # round(0.3 * 16)


def test_pseudo_healthy_identity_on_the_lowest_scored_share_after_warmup():
    n = 8
    cfg, models, updates, a, b = _updates(["loss.pseudo_fraction=0.25", "loss.pseudo_after=0.5",
                                           "loss.lambda_id_out=2.0", "train.steps=100"], n=n)
    with torch.no_grad():
        _, early = updates.generator_loss(a, b, step=49)            # before pseudo_after x steps
        loss, stats = updates.generator_loss(a, b, step=50)
        b_int, m = models.G(a)
        b_prime = L.blend_healthy(a, b_int, m)
        score = (a - b_prime).abs().flatten(1).mean(1)
        low = score.argsort()[:2]                                   # round(0.25 * 8) lowest
        by_hand = (cfg.loss.lambda_id * (b_int[low] - a[low]).abs().mean()
                   + 2.0 * (b_prime[low] - a[low]).abs().mean())
    assert early["pseudo"].item() == 0
    assert stats["pseudo"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert cfg.loss.lambda_id_out == 2.0
    rest = _paper_terms(stats, cfg.loss)
    assert loss.item() == pytest.approx((rest + by_hand).item(), rel=1e-5)


def test_critic_mixed_shows_the_critic_the_mixed_images_as_fakes():
    """loss.critic_mixed: that share of the critic batch's fakes are the mixed images as they are
    (so the critic rates what sets the mixed set apart), the rest their translations B'."""
    n = 4
    cfg, models, updates, a, b = _updates(["loss.critic_mixed=0.5"], n=n)
    seen = {}
    original = updates.critic_outputs

    def spy(real, fake, x_hat, *rest):
        seen["fake"] = fake.detach().clone()
        return original(real, fake, x_hat, *rest)

    updates.critic_outputs = spy
    alpha = torch.full((n, 1, 1, 1), 0.25)
    loss, stats = updates.critic_loss(a, b, alpha)
    with torch.no_grad():
        b_int, m = models.G(a)
        b_prime = L.blend_healthy(a, b_int, m)
        d = models.D(torch.cat([b, seen["fake"]]))
    assert torch.equal(seen["fake"][:2], a[:2])                      # round(0.5 * 4) raw mixed images
    assert torch.allclose(seen["fake"][2:], b_prime[2:])
    assert not torch.allclose(b_prime[:2], a[:2])                   # the swap is visible
    d_real, d_fake = d.split(n)
    assert stats["wasserstein"].item() == pytest.approx((d_fake.mean() - d_real.mean()).item(), rel=1e-5)
    # off (the default): every fake is a translation
    _, models0, off, a0, b0 = _updates([], n=n)
    seen.clear()
    orig0 = off.critic_outputs
    off.critic_outputs = lambda r, f, x, *rest: (seen.__setitem__("fake", f.detach().clone()), orig0(r, f, x, *rest))[1]
    off.critic_loss(a0, b0, alpha)
    with torch.no_grad():
        b_int0, m0 = models0.G(a0)
    assert torch.allclose(seen["fake"], L.blend_healthy(a0, b_int0, m0))


def test_domain_head_classifies_real_images_and_asks_translations_to_look_healthy():
    """loss.lambda_cls (StarGAN's auxiliary classifier, domains mixed / healthy): the critic's second
    channel is trained on real images, mixed 1 and healthy 0 per patch; the generator is asked to
    make B' of mixed images classed healthy. The Wasserstein terms read channel 0 only."""
    n = 4
    cfg, models, updates, a, b = _updates(["loss.lambda_cls=2.0"], n=n)
    assert models.D.domain is not None
    alpha = torch.full((n, 1, 1, 1), 0.25)
    loss, stats = updates.critic_loss(a, b, alpha)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        b_int, m = models.G(a)
        b_prime = L.blend_healthy(a, b_int, m)
        d_real, d_fake, d_mixed = models.D(torch.cat([b, b_prime, a])).split(n)
    assert d_real.shape[1] == 2
    cls_d = (bce(d_mixed[:, 1:], torch.ones_like(d_mixed[:, 1:]))
             + bce(d_real[:, 1:], torch.zeros_like(d_real[:, 1:]))) / 2
    assert stats["cls_d"].item() == pytest.approx(cls_d.item(), rel=1e-5)
    assert stats["wasserstein"].item() == pytest.approx((d_fake[:, 0].mean() - d_real[:, 0].mean()).item(), rel=1e-5)
    assert loss.item() == pytest.approx((stats["wasserstein"] + cfg.loss.lambda_gp * stats["gp"] + 2.0 * cls_d).item(),
                                        rel=1e-5)
    with torch.no_grad():
        g_loss, g_stats = updates.generator_loss(a, b, step=0)
    cls_g = bce(models.D(b_prime)[:, 1:], torch.zeros_like(d_real[:, 1:]))
    assert g_stats["cls"].item() == pytest.approx(cls_g.item(), rel=1e-5)
    rest = _paper_terms(g_stats, cfg.loss)
    assert g_loss.item() == pytest.approx((rest + 2.0 * cls_g).item(), rel=1e-5)
    # off (the default): a one-channel critic, no domain terms
    _, models0, off, a0, b0 = _updates([], n=n)
    assert models0.D.domain is None
    _, s0 = off.critic_loss(a0, b0, alpha)
    assert s0["cls_d"].item() == 0


def test_pu_mask_settles_shared_content_low_and_mixed_only_content_high():
    """loss.pu_mask: a mask that can only tell content kinds apart (one logit for what both sets
    show, one for what only the mixed set shows) trained on the loss alone. Shared content settles
    where the pulls balance, M = w r / (1 + w r) with r the mixed set's share of it; content only the
    mixed set has goes to 1. With no anomalies in the mixed set (share 0), both sets get the same M."""
    w, h = 0.05, 16

    def train(anomalous_rows):
        logits = torch.zeros(2, requires_grad=True)                 # [shared, mixed-only]
        opt = torch.optim.Adam([logits], lr=0.05)
        for _ in range(3000):
            m = torch.sigmoid(logits)
            mixed = m[0].expand(4, 1, h, h).clone()
            mixed[:, :, :anomalous_rows] = m[1]                    # the anomalies' pixels
            healthy = m[0].expand(4, 1, h, h)
            opt.zero_grad()
            L.pu_mask_loss(mixed, healthy, w).backward()
            opt.step()
        return torch.sigmoid(logits).detach()

    m = train(anomalous_rows=4)                                     # a quarter of the mixed pixels
    r = 0.75
    assert m[0].item() == pytest.approx(w * r / (1 + w * r), rel=0.02)
    assert m[1].item() > 0.99
    m0 = train(anomalous_rows=0)                                    # share 0: nothing sets them apart
    assert m0[0].item() == pytest.approx(w / (1 + w), rel=0.02)
    # by hand: cross-entropy to 0 on healthy pixels, w x cross-entropy to 1 on mixed ones
    ma, mb = torch.full((2, 1, 4, 4), 0.2), torch.full((2, 1, 4, 4), 0.1)
    expected = -torch.log(torch.tensor(0.9)) - w * torch.log(torch.tensor(0.2))
    assert L.pu_mask_loss(ma, mb, w).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pu_mask_pooled_over_the_top_pixels_of_each_image():
    """pu_topk > 0: each image counts once, by the mean of its top pu_topk percent of M, so a mixed
    image is judged by where its mask is highest and the rest of it does not count."""
    w = 0.05
    ma = torch.full((2, 1, 10, 10), 0.01)
    ma[0, 0, 0, :2] = 0.9                                           # 2 pixels of 100: the top 2%
    ma[1, 0, 5, 5] = 0.5
    mb = torch.full((2, 1, 10, 10), 0.02)
    mb[1, 0, 9, 9] = 0.3
    top_a = torch.tensor([0.9, (0.5 + 0.01) / 2])
    top_b = torch.tensor([0.02, (0.3 + 0.02) / 2])
    expected = -torch.log1p(-top_b).mean() - w * torch.log(top_a).mean()
    assert L.pu_mask_loss(ma, mb, w, topk_percent=2).item() == pytest.approx(expected.item(), rel=1e-5)
    # the rest of a mixed image does not count once its top is fixed
    ma2 = ma.clone()
    ma2[0][ma2[0] == 0.01] = 0.001                                  # image 0's top is its 2 pixels at 0.9
    assert L.pu_mask_loss(ma2, mb, w, topk_percent=2).item() == pytest.approx(expected.item(), rel=1e-5)
    # a higher top on a mixed image lowers the loss; on a healthy one it raises it
    assert L.pu_mask_loss(ma * 1.05, mb, w, 2) < L.pu_mask_loss(ma, mb, w, 2) < L.pu_mask_loss(ma, mb * 1.5, w, 2)


def test_pu_mask_enters_the_generator_loss_with_lambda_mask():
    n = 4
    cfg, models, updates, a, b = _updates(["loss.pu_mask=0.05", "loss.lambda_mask=2.0"], n=n)
    with torch.no_grad():
        loss, stats = updates.generator_loss(a, b, step=0)
        _, m_a = models.G(a)
        _, m_b = models.G(b)
        by_hand = L.pu_mask_loss(m_a, m_b, 0.05, cfg.loss.pu_topk)
    assert stats["pu"].item() == pytest.approx(by_hand.item(), rel=1e-4)
    rest = _paper_terms(stats, cfg.loss)
    assert loss.item() == pytest.approx((rest + 2.0 * by_hand).item(), rel=1e-5)
    _, _, updates0, a0, b0 = _updates([], n=n)
    with torch.no_grad():
        assert updates0.generator_loss(a0, b0, step=0)[1]["pu"].item() == 0
