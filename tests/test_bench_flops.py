"""puzzlecam.bench.flops: FlopCounterMode's counts of a step against the analytic ones, the peak table,
MFU arithmetic. CPU and meta device only."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from puzzlecam.bench import flops


def _linear_fwd(batch, fan_in, fan_out):
    return 2 * batch * fan_in * fan_out


def test_linear_step_counts_weight_and_input_gradients():
    torch.manual_seed(0)
    batch, fan_in, fan_out = 3, 7, 5
    lin = nn.Linear(fan_in, fan_out)
    fwd = _linear_fwd(batch, fan_in, fan_out)  # addmm: the bias add is not counted

    # Input needs no gradient (a first layer): backward = the weight gradient only = 1x forward.
    x = torch.randn(batch, fan_in)
    got = flops.count_step_flops(lambda: lin(x).sum())
    assert (got.forward, got.backward, got.total) == (fwd, fwd, 2 * fwd)
    assert got.by_op == {"aten.addmm": fwd, "aten.mm": fwd}
    assert lin.weight.grad is not None  # the backward really ran

    # Input needs a gradient: weight gradient + input gradient = 2x forward.
    xg = torch.randn(batch, fan_in, requires_grad=True)
    assert flops.step_flops(lambda: lin(xg).sum()) == 3 * fwd

    # Frozen weights, input gradient: 1x forward again.
    lin.requires_grad_(False)
    assert flops.step_flops(lambda: lin(xg).sum()) == 2 * fwd


def test_two_layer_step_is_under_three_forwards():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 6)
    fwd1, fwd2 = _linear_fwd(2, 6, 8), _linear_fwd(2, 8, 4)
    got = flops.count_step_flops(lambda: net(x).square().mean())
    # Elementwise ops and the loss are free; the first layer gets no input gradient.
    assert got.forward == fwd1 + fwd2
    assert got.backward == fwd1 + 2 * fwd2


def test_conv2d_step_matches_analytic_count():
    torch.manual_seed(0)
    n, c_in, c_out, k, side = 2, 3, 4, 3, 8
    conv = nn.Conv2d(c_in, c_out, k, padding=1)
    fwd = 2 * n * c_out * side * side * c_in * k * k  # 2 x MACs; the bias is not counted
    x = torch.randn(n, c_in, side, side)
    got = flops.count_step_flops(lambda: conv(x).sum())
    assert (got.forward, got.backward) == (fwd, fwd)
    assert got.by_op == {"aten.convolution": fwd, "aten.convolution_backward": fwd}
    xg = x.clone().requires_grad_(True)
    assert flops.step_flops(lambda: conv(xg).sum()) == 3 * fwd


def test_step_that_runs_its_own_backward_and_bad_returns():
    lin = nn.Linear(4, 2, bias=False)
    x = torch.randn(5, 4)

    def step():
        lin(x).sum().backward()

    got = flops.count_step_flops(step)
    assert (got.forward, got.backward) == (2 * _linear_fwd(5, 4, 2), 0)  # all of it counted as forward
    with pytest.raises(ValueError, match="scalar loss"):
        flops.count_step_flops(lambda: lin(x))


def test_meta_device_counts_without_compute():
    with torch.device("meta"):
        lin = nn.Linear(1024, 1024, bias=False)
        x = torch.empty(4096, 1024, requires_grad=True)
    assert flops.step_flops(lambda: lin(x).sum()) == 3 * _linear_fwd(4096, 1024, 1024)


def test_resnet50_forward_flops():
    # The usual ResNet-50 figure: 4.09 GMACs at 224 px (ours has a 1x1 conv to 20 classes instead of the fc).
    per_image = flops.resnet50_forward_flops(224)
    assert per_image == pytest.approx(8.18e9, rel=2e-3)
    # Linear in the batch; output stride 16 (dilated layer4 at 14x14) costs more.
    small = flops.resnet50_forward_flops(64)
    assert flops.resnet50_forward_flops(64, batch=2) == 2 * small
    assert flops.resnet50_forward_flops(64, output_stride=16) > small


def test_mfu_arithmetic():
    assert flops.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert flops.mfu(0, 1.0, 1e12) == 0.0
    assert flops.mfu(1e12, 1.0, None) is None
    with pytest.raises(ValueError):
        flops.mfu(1e12, 0.0, 1e12)
    with pytest.raises(ValueError):
        flops.mfu(-1, 1.0, 1e12)
    with pytest.raises(ValueError):
        flops.mfu(1e12, 1.0, 0.0)


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "product", "precision", "value"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, "H100 SXM", "bf16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, False, "H100 SXM", "fp32", 66.9e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, True, "H100 SXM", "tf32", 494.7e12),
        ("NVIDIA H100 80GB HBM3", torch.float16, False, "H100 SXM", "fp16", 989.4e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, "H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", torch.bfloat16, False, "H200 SXM", "bf16", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, "A100", "bf16", 312e12),
        ("NVIDIA A100 80GB PCIe", torch.float32, False, "A100", "fp32", 19.5e12),
    ],
)
def test_lookup_peak_known(name, dtype, tf32, product, precision, value):
    peak = flops.lookup_peak(name, dtype, tf32)
    assert peak is not None
    assert (peak.gpu, peak.precision, peak.flops) == (product, precision, value)
    assert peak.source == "NVIDIA datasheet, dense"


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("Fake GPU 9000", torch.bfloat16),
        ("NVIDIA H100 NVL", torch.bfloat16),  # other clocks: no figure rather than a wrong one
        ("NVIDIA GH200 480GB", torch.bfloat16),
        ("NVIDIA H100 80GB HBM3", torch.float64),
        ("NVIDIA H100 80GB HBM3", torch.int8),
    ],
)
def test_lookup_peak_unknown(name, dtype):
    assert flops.lookup_peak(name, dtype) is None


def test_peak_flops_cpu_is_none():
    assert flops.peak_flops(torch.device("cpu"), torch.float32) is None
    assert flops.peak_flops("cpu", torch.bfloat16, tf32=True) is None
