"""Batch normalization layers whose statistics stay fp32 under mixed precision (docs/model.md).

All classes are ``nn.BatchNorm2d`` subclasses with its exact parameter and buffer names, so
torchvision state dicts load unchanged and ``isinstance(m, nn.BatchNorm2d)`` still holds.

* :class:`BatchNorm2d` ("train" mode): ordinary batch norm.
* :class:`FrozenStatsBatchNorm2d` ("frozen" mode): always normalizes with the running statistics and
  never updates them, also in ``model.train()`` (the reference code's ``FixedBatchNorm``). The
  affine weight and bias stay trainable, as in the reference code.
* :class:`SyncBatchNorm2d` ("sync" mode): in training, the batch statistics of the whole global
  micro-batch (every rank's images), as one process holding all of them would compute; alone or in
  eval mode, ordinary batch norm.

Mixed precision: ``model.half()`` / ``model.bfloat16()`` (what DeepSpeed does to the module) leave
``running_mean`` / ``running_var`` in fp32 (see ``_apply``); the affine parameters follow the
model's dtype so that optimizers which flatten all parameters of one dtype keep working. The
normalization itself runs with fp32 statistics and fp32 affine parameters; the output has the
input's dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that keeps its running statistics in fp32 and computes with them in fp32."""

    use_batch_stats = True  # False in the frozen variant

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        # A cast to half precision must not reach the statistics: undo it for the two buffers.
        for name in ("running_mean", "running_var"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype in _HALF_DTYPES:
                self._buffers[name] = buf.float()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        training = self.training and self.use_batch_stats
        if training:
            self.num_batches_tracked.add_(1)
        stats_dtype = self.running_mean.dtype  # fp32 unless the whole model was made fp64
        weight, bias = self.weight.to(stats_dtype), self.bias.to(stats_dtype)
        # CUDA batch norm takes half inputs with fp32 statistics and parameters natively; elsewhere
        # (older torch CPU kernels) compute in the statistics' dtype and cast back.
        native_mixed = x.is_cuda and x.dtype in _HALF_DTYPES
        inp = x if native_mixed else x.to(stats_dtype)
        out = F.batch_norm(
            inp,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            training=training,
            momentum=self.momentum,
            eps=self.eps,
        )
        return out.to(x.dtype)


class FrozenStatsBatchNorm2d(BatchNorm2d):
    """Batch norm that always uses (and never updates) its running statistics; affine params train."""

    use_batch_stats = False


def _group_size() -> int:
    """Ranks of the default process group; 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


_REDUCED_DIMS = (0, 2, 3)  # every dimension but the channels


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the micro-batches of all ranks, with its exact backward.

    ``apply(x, weight, bias, eps, synchronize) -> (y, mean, unbiased_var)``. ``weight`` and ``bias``
    are in the compute dtype (fp32, or fp64 for a fp64 model); ``x`` may be half precision: it is read
    in the compute dtype and saved as it came (the memory native batch norm saves), and ``y`` has its
    dtype. ``mean`` and the unbiased variance (for the running statistics) are not differentiable.
    ``synchronize=False`` skips the two collectives: the one-process batch norm with the same code.

    Forward: each rank's per-channel count n_i, sum and sum of squares go through ONE all_reduce in
    fp64, packed as (C sums, C sums of squares, 1 count); unequal n_i just add up. The sums are built
    from each rank's own mean and variance (``torch.var_mean``, stable), and the global variance
    Q/N - mean^2 is formed in fp64, so a large mean next to a small spread does not cancel it away.
    Backward: dx = w * invstd * (dy - sum(dy)/N - xhat * sum(dy * xhat)/N) with both sums over all
    ranks (ONE all_reduce of 2C values); the weight and bias gradients stay local, summed over ranks by
    the data-parallel gradient all-reduce as every other parameter's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, synchronize: bool):
        compute_dtype = weight.dtype
        channels = x.shape[1]
        local_count = x.numel() // channels
        xc = x.to(compute_dtype)
        if local_count > 0:
            var, mean = torch.var_mean(xc, dim=_REDUCED_DIMS, correction=0)
        else:  # an empty micro-batch on this rank still joins the collectives
            var = mean = torch.zeros(channels, dtype=compute_dtype, device=x.device)
        mean64, var64 = mean.double(), var.double()
        count = torch.full((1,), float(local_count), dtype=torch.float64, device=x.device)
        packed = torch.cat([mean64 * local_count, (var64 + mean64 * mean64) * local_count, count])
        if synchronize:
            dist.all_reduce(packed)
        total = packed[-1]
        if local_count <= 1 and total.item() <= 1:  # a host sync only where the batch may be too small
            raise ValueError(
                f"batch norm needs more than 1 value per channel in training; the global micro-batch of "
                f"input shape {tuple(x.shape)} has {int(total.item())}"
            )
        global_mean = packed[:channels] / total
        global_var = (packed[channels : 2 * channels] / total - global_mean * global_mean).clamp_min(0)
        unbiased_var = (global_var * total / (total - 1)).to(compute_dtype)
        invstd = torch.rsqrt(global_var + eps).to(compute_dtype)
        global_mean = global_mean.to(compute_dtype)
        scale = weight * invstd
        y = torch.addcmul(_per_channel(bias - global_mean * scale), xc, _per_channel(scale))
        ctx.save_for_backward(x, weight, global_mean, invstd, total.to(compute_dtype))
        ctx.synchronize = synchronize
        ctx.mark_non_differentiable(global_mean, unbiased_var)
        return y.to(x.dtype), global_mean, unbiased_var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd, total = ctx.saved_tensors
        compute_dtype = weight.dtype
        dy = grad_y.to(compute_dtype)
        centered = x.to(compute_dtype) - _per_channel(mean)
        sum_dy = dy.sum(_REDUCED_DIMS)
        sum_dy_centered = (dy * centered).sum(_REDUCED_DIMS)
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_centered])
            if ctx.synchronize:
                dist.all_reduce(packed)
            global_sum_dy, global_sum_dy_centered = packed.split(len(sum_dy))
            scale = weight * invstd
            # weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = centered * invstd; in place
            # on `centered` (a fresh tensor) to keep the activation-sized temporaries few.
            centered_coef = -scale * invstd * invstd * global_sum_dy_centered / total
            grad_x = centered.mul_(_per_channel(centered_coef))
            grad_x.add_(_per_channel(-scale * global_sum_dy / total)).addcmul_(dy, _per_channel(scale))
            grad_x = grad_x.to(x.dtype)
        grad_weight = sum_dy_centered * invstd if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


class SyncBatchNorm2d(BatchNorm2d):
    """Batch norm whose training statistics are those of the global micro-batch, over all ranks.

    With a default process group of more than one rank, in training: normalizes with the mean and
    biased variance of every rank's micro-batch together and updates the running statistics with the
    unbiased global variance, exactly what one process holding the whole batch would do
    (``nn.BatchNorm2d``'s rules). Costs one all_reduce per layer per forward and one per backward; all
    ranks must run the same layers. Alone (no group, one rank), in eval mode: :class:`BatchNorm2d`.

    One implementation on CPU (gloo) and CUDA (nccl) rather than torch's own ``nn.SyncBatchNorm`` on
    CUDA: torch's refuses CPU tensors, so its CUDA path would be the one path our CPU test suite never
    runs; its autograd function is private API whose signature has changed between releases; and it
    reads the gathered counts back to the host in every forward (a GPU sync per layer), where this one
    stays on the device. The price is a few unfused elementwise passes where torch has fused kernels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.use_batch_stats) or _group_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        stats_dtype = self.running_mean.dtype
        # The statistics and the normalization in fp32 whatever autocast would pick; y has x's dtype.
        with torch.autocast(x.device.type, enabled=False):
            y, mean, unbiased_var = _SyncBatchNormFunction.apply(
                x, self.weight.to(stats_dtype), self.bias.to(stats_dtype), self.eps, True
            )
        with torch.no_grad():  # nn.BatchNorm2d's update: (1 - momentum) * running + momentum * batch
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(unbiased_var, alpha=self.momentum)
        return y


_NORM_LAYERS: dict[str, type[BatchNorm2d]] = {
    "train": BatchNorm2d,
    "frozen": FrozenStatsBatchNorm2d,
    "sync": SyncBatchNorm2d,
}


def norm_layer(mode: str) -> type[BatchNorm2d]:
    """The norm class for ModelConfig.norm: "train" -> BatchNorm2d, "frozen" -> FrozenStatsBatchNorm2d,
    "sync" -> SyncBatchNorm2d."""
    if mode not in _NORM_LAYERS:
        raise ValueError(f"model.norm must be one of {', '.join(_NORM_LAYERS)}, got {mode!r}")
    return _NORM_LAYERS[mode]
