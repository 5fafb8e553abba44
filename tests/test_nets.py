"""Network layouts (shared/DESIGN.md "Model") and the mask-collapse options."""
import pytest
import torch

from a2b_dist.config import load_config
from a2b_dist.nets import Critic, Generator, build_critic, build_generator, count_parameters, critic_depth


def test_parameter_counts_match_the_authors_networks():
    assert count_parameters(Generator(3)) == pytest.approx(8.4e6, rel=0.01)
    assert count_parameters(Critic(3, 128)) == pytest.approx(44.7e6, rel=0.01)
    assert count_parameters(Critic(3, 256)) == count_parameters(Critic(3, 128))   # 6 layers from 128 px


@pytest.mark.parametrize("size, depth, patch", [(32, 4, 2), (64, 5, 2), (128, 6, 2), (256, 6, 4), (512, 6, 8)])
def test_critic_depth_follows_image_size(size, depth, patch):
    assert critic_depth(size) == depth
    critic = Critic(1, size, width=4)
    assert critic(torch.zeros(1, 1, size, size)).shape == (1, 1, patch, patch)


def test_critic_has_no_normalisation():
    norms = (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    assert not any(isinstance(m, norms) for m in Critic(1, 64).modules())


@pytest.mark.parametrize("upsample", ["transpose", "nearest", "bilinear"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_outputs(upsample, activation, channels):
    torch.manual_seed(0)
    gen = Generator(channels, width=4, res_blocks=1, upsample=upsample, mask_activation=activation)
    x = torch.rand(2, channels, 32, 32) * 2 - 1
    b_int, mask = gen(x)
    assert b_int.shape == x.shape and mask.shape == (2, 1, 32, 32)
    assert b_int.abs().max() <= 1 and 0 <= mask.min() and mask.max() <= 1
    uses_transpose = any(isinstance(m, torch.nn.ConvTranspose2d) for m in gen.modules())
    assert uses_transpose == (upsample == "transpose")


def test_tanh_mask_is_rescaled_tanh():
    torch.manual_seed(0)
    a = Generator(1, width=4, res_blocks=1, mask_activation="sigmoid")
    b = Generator(1, width=4, res_blocks=1, mask_activation="tanh")
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 1, 32, 32)
    logit = a.main(x)[:, 1:]
    assert torch.allclose(b(x)[1], (torch.tanh(logit) + 1) / 2)
    assert torch.allclose(a(x)[1], torch.sigmoid(logit))


def test_resize_upsampling_has_no_checkerboard_on_a_constant_input():
    """A constant feature map through resize-then-conv stays constant away from the border; a
    stride-2 transposed convolution with a generic kernel gives a period-2 pattern."""
    torch.manual_seed(0)
    gen_t = Generator(1, width=4, res_blocks=0, upsample="transpose")
    gen_n = Generator(1, width=4, res_blocks=0, upsample="nearest")
    feat = torch.ones(1, 16, 8, 8)
    up_t = gen_t.main[9](feat)[0, 0, 4:-4, 4:-4]     # first upsampling layer (ConvTranspose2d)
    up_n = gen_n.main[9](feat)[0, 0, 4:-4, 4:-4]     # Upsample + Conv2d
    assert up_n.std() < 1e-5
    assert up_t.std() > 1e-3


def test_builders_read_the_config():
    cfg = load_config("configs/test.yaml", ["model.upsample=bilinear", "model.mask_activation=tanh"])
    gen = build_generator(cfg.model, cfg.data.channels)
    assert gen.mask_activation == "tanh"
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in gen.modules())
    critic = build_critic(cfg.model, cfg.data.channels, cfg.data.image_size)
    assert critic(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_mask_prior_starts_the_mask_small_and_off_changes_nothing(activation):
    """model.mask_prior: M starts near the prior instead of near 0.5, through one learnt bias that
    takes a gradient; at 0 the network, its state and its outputs are the paper's."""
    torch.manual_seed(0)
    plain = Generator(1, width=4, res_blocks=1, mask_activation=activation)
    torch.manual_seed(0)
    off = Generator(1, width=4, res_blocks=1, mask_activation=activation, mask_prior=0.0)
    torch.manual_seed(0)
    on = Generator(1, width=4, res_blocks=1, mask_activation=activation, mask_prior=0.05)
    assert off.state_dict().keys() == plain.state_dict().keys()
    assert set(on.state_dict()) - set(plain.state_dict()) == {"mask_bias"}
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert torch.equal(off(x)[1], plain(x)[1])
    assert 0.3 < plain(x)[1].mean() < 0.7
    b_int, mask = on(x)
    assert torch.equal(b_int, plain(x)[0])                   # the image head is untouched
    logit = plain.main(x)[:, 1:]                              # the same weights: only the bias differs
    shift = torch.logit(torch.tensor(0.05)) * (1 if activation == "sigmoid" else 0.5)
    expected = torch.sigmoid(logit + shift) if activation == "sigmoid" else (torch.tanh(logit + shift) + 1) / 2
    assert torch.allclose(mask, expected, atol=1e-6)
    mask.mean().backward()
    assert on.mask_bias.grad is not None and on.mask_bias.grad > 0


def test_mask_prior_is_read_from_the_config_and_checked():
    cfg = load_config("configs/test.yaml", ["model.mask_prior=0.05"])
    gen = build_generator(cfg.model, cfg.data.channels)
    assert gen.mask_bias is not None
    with pytest.raises(ValueError, match="mask_prior"):
        Generator(1, width=4, res_blocks=1, mask_prior=1.0)
