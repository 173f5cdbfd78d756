"""The training step's loss composition (puzzlecam.tasks.classification): the options of the original code."""

from __future__ import annotations

import pytest
import torch

from puzzlecam import puzzle
from puzzlecam.config import load_config
from puzzlecam.puzzle import PuzzleSpec
from puzzlecam.tasks.classification import step_losses


def _maps(seed=0, b=2, c=4, n=2):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.randn(b, c, 6, 8, generator=gen, requires_grad=True)
    tiles = torch.randn(n * n * b, c, 3, 4, generator=gen, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    return cams, tiles, labels


@pytest.mark.filterwarnings("ignore:puzzlecam.ops. the cpp backend has no re_reduction")  # tested in test_ops
@pytest.mark.parametrize("reduction", puzzle.RE_REDUCTIONS)
@pytest.mark.parametrize("conf_weight", [0.0, 0.5])
def test_total_is_cls_pcls_alpha_re_and_weighted_conf(reduction, conf_weight):
    cfg = load_config(None, [f"puzzle.re_reduction={reduction}", f"puzzle.conf_weight={conf_weight}"])
    cams, tiles, labels = _maps()
    got = step_losses(cams, tiles, labels, cfg, alpha=2.0)
    want = puzzle.puzzle_losses(cams, tiles, labels, PuzzleSpec(reduction=reduction, with_conf=True))
    # The step runs the C++ backend here (its sums may differ from the reference's in the last bit).
    for name in ("cls", "pcls", "re"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=0)
    if conf_weight:
        assert torch.equal(got.conf, want.conf) and got.conf > 0
    else:
        assert got.conf.item() == 0.0  # off: not computed
    expected = want.cls + want.pcls + 2.0 * want.re + conf_weight * want.conf
    torch.testing.assert_close(got.total, expected, rtol=1e-6, atol=0)


def test_conf_weight_reaches_the_tile_gradient():
    cams, tiles, labels = _maps(seed=1)
    grads = []
    for weight in (0.0, 1.0):
        cfg = load_config(None, [f"puzzle.conf_weight={weight}"])
        (g,) = torch.autograd.grad(step_losses(cams, tiles, labels, cfg, alpha=0.0).total, (tiles,))
        grads.append(g)
    assert not torch.allclose(grads[0], grads[1])


def test_baseline_mode_is_the_classification_loss_only():
    cfg = load_config(None, ["train.mode=baseline", "puzzle.conf_weight=1"])
    cams, _, labels = _maps()
    got = step_losses(cams, None, labels, cfg, alpha=4.0)
    assert torch.equal(got.total, puzzle.classification_loss(puzzle.gap(cams), labels))
    assert got.re.item() == got.pcls.item() == got.conf.item() == 0.0
