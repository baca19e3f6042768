import pytest
import torch
from torch import nn

import quant

W = torch.tensor([[-1.0, 0.5, 0.25], [2.0, -0.1, 0.0]], dtype=torch.float64)


def test_symmetric_per_channel_codes_by_hand():
    q = quant.quantize(W, 4)
    assert torch.equal(q.scale.flatten(), torch.tensor([1 / 7, 2 / 7], dtype=torch.float64))
    # 0.5 / (1/7) = 3.5 -> 4 (half to even), 0.25 * 7 = 1.75 -> 2, -0.1 * 3.5 = -0.35 -> 0
    assert q.codes.tolist() == [[-7, 4, 2], [7, 0, 0]]
    expected = (4 / 7 - 0.5) ** 2 + (2 / 7 - 0.25) ** 2 + 0.1**2
    assert abs(quant.perturbation_norm_sq(W, 4) - expected) < 1e-15
    assert torch.allclose(quant.quantize_weight(W, 4), q.scale * q.codes, rtol=0, atol=1e-15)


def test_half_to_even_ties():
    # scale 1 (alpha = 7 at 4 bits): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2
    w = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5], dtype=torch.float64)
    q = quant.quantize(w, 4, per_channel=False)
    assert q.scale.item() == 1.0
    assert q.codes.tolist() == [7, 0, 2, 2, 0, -2]


def test_asymmetric_clamp_range():
    w = torch.tensor([-1.0, 7.0], dtype=torch.float64)
    # symmetric 4-bit: alpha = 7, S = 1, codes clamp to [-8, 7]; -1 stays -1
    assert quant.quantize(w, 4, per_channel=False).codes.tolist() == [-1, 7]
    w = torch.tensor([-9.0, 7.0])
    q = quant.quantize(w, 4, per_channel=False)  # alpha = 9, S = 9/7: -7 and 5.44 -> 5
    assert q.codes.tolist() == [-7, 5]
    for bits in (2, 4, 8):
        x = torch.randn(200, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) * 3
        c = quant.quantize(x, bits, per_channel=False).codes
        assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
        assert c.max() == 2 ** (bits - 1) - 1 or c.min() == -(2 ** (bits - 1)) + 1


def test_asymmetric_zero_point_codes():
    q = quant.quantize(torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64), 2, symmetric=False, per_channel=False)
    assert abs(q.scale.item() - 1 / 3) < 1e-15 and q.zero_point.item() == 0
    assert q.codes.tolist() == [0, 1, 3]
    q = quant.quantize(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64), 2, symmetric=False, per_channel=False)
    assert q.zero_point.item() == 1 and q.codes.tolist() == [0, 1, 3]
    assert torch.allclose(q.dequantize(torch.float64), torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64))


def test_per_channel_scales_follow_the_output_axis():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.25]], dtype=torch.float64)
    per_channel = quant.quantize(w, 8)
    assert torch.allclose(per_channel.scale.flatten(), torch.tensor([3.0, 0.5], dtype=torch.float64) / 127)
    per_tensor = quant.quantize(w, 8, per_channel=False)
    assert per_tensor.scale.item() == 3.0 / 127
    cols = quant.quantize(w, 8, channel_axis=1)
    assert torch.allclose(cols.scale.flatten(), torch.tensor([1.0, 3.0], dtype=torch.float64) / 127)
    conv = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    q = quant.quantize(conv, 4)
    assert q.scale.shape == (4, 1, 1, 1)
    assert torch.allclose(q.scale.flatten(), conv.abs().amax(dim=(1, 2, 3)).double() / 7)


def test_more_bits_never_larger_error_and_bits_checked():
    w = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    errs = [quant.perturbation_norm_sq(w, b) for b in (2, 4, 8, 16)]
    assert errs == sorted(errs, reverse=True)
    assert quant.perturbation_norm_sq(w, 1) > errs[0]  # 1 bit is allowed
    for bad in (0, 33, -1):
        with pytest.raises(ValueError, match="1..32"):
            quant.quantize_weight(w, bad)
    with pytest.raises(TypeError):
        quant.quantize_weight(w, 4.0)


def test_activation_quantizer_calibrates_with_ema():
    aq = quant.ActivationQuantizer(4, momentum=0.5)
    aq(torch.tensor([-1.0, 1.0]))
    aq(torch.tensor([-3.0, 3.0]))
    assert aq.x_min.item() == -2.0 and aq.x_max.item() == 2.0
    aq.calibrating = False
    out = aq(torch.tensor([0.0, 2.0, 5.0, -5.0]))
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 2.0, -16 / 7]))
    with pytest.raises(RuntimeError, match="calibration"):
        fresh = quant.ActivationQuantizer(4)
        fresh.calibrating = False
        fresh(torch.zeros(2))


def test_fold_batchnorm_matches_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1, bias=False),
                          nn.BatchNorm2d(2))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-1, 1, generator=g)
    model.eval()
    folded = quant.fold_batchnorm(model)
    x = torch.randn(4, 2, 6, 6, generator=g)
    assert torch.allclose(model(x), folded(x), atol=1e-5)
    assert isinstance(folded[1], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)
