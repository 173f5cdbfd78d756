"""model.norm "sync": batch statistics over all ranks equal one process holding the whole batch (docs/model.md).

The multi-rank checks run in real gloo process groups on loopback: 2 processes with "sync" against the
same model with "train" given every rank's images in one process.
"""

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from puzzlecam.config import ModelConfig
from puzzlecam.model import BatchNorm2d, SyncBatchNorm2d, build_model, norm_layer
from puzzlecam.model.norm import _SyncBatchNormFunction
from puzzlecam.utils.net import free_port

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
WORLD = 2
NUM_CLASSES = 5


def _model(norm: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet18", width=8, norm=norm, num_classes=NUM_CLASSES)).to(dtype)


def _images(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 64, 64, generator=gen, dtype=torch.float64).to(dtype)
    labels = (torch.rand(n, NUM_CLASSES, generator=gen) > 0.5).to(dtype)
    return x, labels


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# ---------------------------------------------------------------------------------------------
# One process


def test_sync_norm_is_a_batch_norm_with_the_same_state_dict():
    assert norm_layer("sync") is SyncBatchNorm2d
    sync, train = _model("sync"), _model("train")
    assert _norms(sync) and all(type(m) is SyncBatchNorm2d for m in _norms(sync))
    assert {k: v.shape for k, v in sync.state_dict().items()} == {k: v.shape for k, v in train.state_dict().items()}
    train.load_state_dict(sync.state_dict())  # strict, both ways: checkpoints and inference read either
    sync.load_state_dict(train.state_dict())


def test_alone_sync_norm_is_plain_batch_norm():
    # No process group: exactly the "train" model, outputs, gradients and running statistics.
    assert not dist.is_initialized()
    x, labels = _images(4, torch.float32)
    results = []
    for norm in ("sync", "train"):
        model = _model(norm).train()
        logits, cams = model(x)
        F.multilabel_soft_margin_loss(logits, labels).backward()
        results.append([logits, cams, *(p.grad for p in model.parameters()), *model.buffers()])
    assert all(torch.equal(got, want) for got, want in zip(*results, strict=True))


def test_sync_norm_in_eval_equals_batch_norm_in_eval():
    sync, train = _model("sync"), _model("train")
    for m in _norms(sync):  # non-trivial statistics
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    train.load_state_dict(sync.state_dict())
    x, _ = _images(2, torch.float32)
    with torch.no_grad():
        assert torch.equal(sync.eval()(x)[1], train.eval()(x)[1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_function_gradcheck_and_statistics(channels_last):
    # The world-size-1 path of the autograd function (same code as the multi-rank one but the collectives).
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *t: _SyncBatchNormFunction.apply(*t, 1e-5, False)[0], inputs)
    y, mean, unbiased_var = _SyncBatchNormFunction.apply(*inputs, 1e-5, False)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unbiased_var, x.var((0, 2, 3)), rtol=1e-12, atol=1e-12)
    want = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_function_keeps_the_variance_of_a_large_mean():
    # fp32 values around 1000 with spread 0.01: an fp32 sum of squares minus the squared mean would lose the
    # variance entirely (1000^2 carries ~0.06 of rounding, the variance is 1e-4).
    gen = torch.Generator().manual_seed(3)
    x = (1000 + 0.01 * torch.randn(8, 3, 7, 7, generator=gen)).float()
    _, _, unbiased_var = _SyncBatchNormFunction.apply(x, torch.ones(3), torch.zeros(3), 1e-5, False)
    torch.testing.assert_close(unbiased_var.double(), x.double().var((0, 2, 3)), rtol=1e-4, atol=0)


def test_function_half_input_computes_in_fp32():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 6, 6, generator=gen).bfloat16().requires_grad_()
    weight, bias = torch.rand(3, generator=gen).add(0.5).requires_grad_(), torch.zeros(3, requires_grad=True)
    y, mean, unbiased_var = _SyncBatchNormFunction.apply(x, weight, bias, 1e-5, False)
    assert y.dtype == torch.bfloat16 and mean.dtype == unbiased_var.dtype == torch.float32
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    x32 = x.detach().float().requires_grad_()
    want = F.batch_norm(x32, None, None, weight.detach(), bias.detach(), training=True, eps=1e-5)
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(unbiased_var, x32.detach().var((0, 2, 3)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Two gloo ranks against one process with the whole batch


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _model_step(rank: int, dtype: torch.dtype, counts: tuple[int, int]) -> None:
    """One training forward/backward of the resnet18 classifier, "sync" on 2 ranks vs "train" on all images."""
    total = sum(counts)
    start, stop = sum(counts[:rank]), sum(counts[: rank + 1])
    x, labels = _images(total, dtype)
    tol = TOLERANCE[dtype]

    sync = _model("sync", dtype).train()
    logits, cams = sync(x[start:stop])
    # DDP's rule: the mean of the ranks' local-mean losses; weighted so that it is the global mean when the
    # ranks' batches differ (counts (4, 4) give the weight 1).
    local_loss = F.multilabel_soft_margin_loss(logits, labels[start:stop]) * (stop - start) * WORLD / total
    local_loss.backward()
    loss = _all_reduce_sum(local_loss) / WORLD
    grads = {name: _all_reduce_sum(p.grad) / WORLD for name, p in sync.named_parameters()}

    train = _model("train", dtype).train()
    want_logits, want_cams = train(x)
    want_loss = F.multilabel_soft_margin_loss(want_logits, labels)
    want_loss.backward()

    torch.testing.assert_close(logits, want_logits[start:stop], **tol, msg=lambda m: f"logits: {m}")
    torch.testing.assert_close(cams, want_cams[start:stop], **tol, msg=lambda m: f"cams: {m}")
    torch.testing.assert_close(loss, want_loss.detach(), **tol, msg=lambda m: f"loss: {m}")
    for name, p in train.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    want_buffers = dict(train.named_buffers())
    for name, buf in sync.named_buffers():
        torch.testing.assert_close(buf, want_buffers[name], **tol, msg=lambda m, name=name: f"buffer {name}: {m}")


def _layer_step(rank: int, counts: tuple[int, int], tail: tuple[int, int], dtype: torch.dtype, **tol) -> None:
    """One SyncBatchNorm2d layer (momentum 0.5) on 2 ranks vs BatchNorm2d on all rows; ``dtype`` may be bf16
    (then under autocast, against the fp32 layer on the same bf16 values)."""
    channels, total = 3, sum(counts)
    start, stop = sum(counts[:rank]), sum(counts[: rank + 1])
    gen = torch.Generator().manual_seed(5)
    x_all = (torch.randn(total, channels, *tail, generator=gen, dtype=torch.float64) * 1.5 + 2).to(dtype)
    grad_all = torch.randn(total, channels, *tail, generator=gen, dtype=torch.float64).to(dtype)
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype

    layer, want_layer = (cls(channels, momentum=0.5).to(param_dtype) for cls in (SyncBatchNorm2d, BatchNorm2d))
    with torch.no_grad():
        for m in (layer, want_layer):
            m.weight.copy_(torch.linspace(0.5, 1.5, channels))
            m.bias.copy_(torch.linspace(-1, 1, channels))
    x = x_all[start:stop].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x)
    assert y.dtype == dtype and layer.running_var.dtype == param_dtype
    (y.to(param_dtype) * grad_all[start:stop].to(param_dtype)).sum().backward()

    want_x = x_all.to(param_dtype).requires_grad_()
    want_y = want_layer(want_x)
    (want_y * grad_all.to(param_dtype)).sum().backward()

    torch.testing.assert_close(y.to(param_dtype), want_y[start:stop], **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(x.grad.to(param_dtype), want_x.grad[start:stop], **tol, msg=lambda m: f"dx: {m}")
    for name in ("weight", "bias"):
        got = _all_reduce_sum(getattr(layer, name).grad)
        torch.testing.assert_close(got, getattr(want_layer, name).grad, **tol, msg=lambda m, n=name: f"d{n}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # fp32 statistics: tight in every case
        got, want = getattr(layer, name), getattr(want_layer, name)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _eval_needs_no_peer(rank: int) -> None:
    # Only rank 0 runs the model in eval mode: a collective there would pair with rank 1's all_reduce below.
    sync, train = _model("sync"), _model("train")
    for m in _norms(sync):
        m.running_mean.uniform_(-0.5, 0.5)
    train.load_state_dict(sync.state_dict())
    if rank == 0:
        x, _ = _images(2, torch.float32)
        with torch.no_grad():
            assert torch.equal(sync.eval()(x)[1], train.eval()(x)[1])
    token = _all_reduce_sum(torch.tensor([rank + 1.0]))
    assert token.item() == 3.0, token


def _plain_norm_cannot_train_on_one_value(rank: int) -> None:
    try:
        BatchNorm2d(3).train()(torch.randn(1, 3, 1, 1))
    except ValueError as e:
        assert "more than 1 value per channel" in str(e), e
    else:
        raise AssertionError("plain batch norm trained on one value per channel")


SCENARIOS = {
    "model_fp64_4+4": lambda rank: _model_step(rank, torch.float64, (4, 4)),
    "model_fp32_4+4": lambda rank: _model_step(rank, torch.float32, (4, 4)),
    "model_fp64_3+5": lambda rank: _model_step(rank, torch.float64, (3, 5)),
    "model_fp32_3+5": lambda rank: _model_step(rank, torch.float32, (3, 5)),
    # A (B, C, 1, 1) input with one image per rank: plain batch norm refuses it, the global batch has 2.
    "plain_refuses_one_value": _plain_norm_cannot_train_on_one_value,
    "layer_1+1_on_1x1": lambda rank: _layer_step(rank, (1, 1), (1, 1), torch.float64, **TOLERANCE[torch.float64]),
    "layer_0+4_empty_rank": lambda rank: _layer_step(rank, (0, 4), (3, 5), torch.float64, **TOLERANCE[torch.float64]),
    "layer_bf16_autocast": lambda rank: _layer_step(rank, (4, 4), (5, 5), torch.bfloat16, rtol=2e-2, atol=2e-2),
    "eval_needs_no_peer": _eval_needs_no_peer,
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A mismatched collective fails within the timeout instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    failures = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                scenario(rank)
            except Exception as e:  # recorded; a rank that stopped mid-scenario fails the barrier's timeout
                failures[name] = f"{type(e).__name__}: {e}"
            dist.barrier()
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(failures))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_failures(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_norm")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_with_sync_equal_one_process_with_the_whole_batch(two_rank_failures, scenario):
    for rank, failures in enumerate(two_rank_failures):
        assert scenario not in failures, f"rank {rank}: {failures[scenario]}"
