"""Batch normalization layers whose statistics stay fp32 under mixed precision.

Both classes are ``nn.BatchNorm2d`` subclasses with its exact parameter and buffer names, so
torchvision state dicts load unchanged and ``isinstance(m, nn.BatchNorm2d)`` still holds.

* :class:`BatchNorm2d` ("train" mode): ordinary batch norm.
* :class:`FrozenStatsBatchNorm2d` ("frozen" mode): always normalizes with the running statistics and
  never updates them, also in ``model.train()`` (the reference code's ``FixedBatchNorm``). The
  affine weight and bias stay trainable, as in the reference code.

Mixed precision: ``model.half()`` / ``model.bfloat16()`` (what DeepSpeed does to the module) leave
``running_mean`` / ``running_var`` in fp32 (see ``_apply``); the affine parameters follow the
model's dtype so that optimizers which flatten all parameters of one dtype keep working. The
normalization itself runs with fp32 statistics and fp32 affine parameters; the output has the
input's dtype.
"""

from __future__ import annotations

import torch
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


def norm_layer(mode: str) -> type[BatchNorm2d]:
    """The norm class for ModelConfig.norm: "train" -> BatchNorm2d, "frozen" -> FrozenStatsBatchNorm2d."""
    if mode == "train":
        return BatchNorm2d
    if mode == "frozen":
        return FrozenStatsBatchNorm2d
    raise ValueError(f"model.norm must be 'train' or 'frozen', got {mode!r}")
