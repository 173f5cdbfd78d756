"""Reference Puzzle-CAM math in pure torch: the oracle every kernel is tested against.

Semantics (docs/method.md):

* ``tile(x, n)``: (B, C, H, W) -> (n*n*B, C, H/n, W/n); piece p = i*n + j (row i, column j) of
  image b lands at batch index p*B + b ("piece-major").
* ``merge(t, n)``: the exact inverse of ``tile``.
* ``make_cam(a)`` = relu(a - eps) / (max_hw relu(a) + eps), per (b, c).
* ``reconstruction_loss``: |A - merge(A_tiles)| (or its square) at level "feature" (raw maps) or
  "cam" (make_cam of both), reduced as the original code's ``re_loss_option``: "masking" (the mean
  over all B*C*h*w elements of the error times the label), "selection" (per image, the mean over its
  labelled classes' maps; then the mean over the batch) or "none" (the plain mean).
* ``shannon_entropy_loss``: the original's optional "conf" term on the tiles' logits.
* ``puzzle_losses``: the terms cls, pcls, re and conf.

Losses are computed in float64 when the maps are float64 (for gradcheck and as an exact oracle), and
in fp32 for fp32, bf16 and fp16 maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

LEVELS = ("feature", "cam")
KINDS = ("l1", "l2")
RE_REDUCTIONS = ("masking", "selection", "none")
CAM_EPS = 1e-5
ENTROPY_EPS = 1e-5


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half-precision inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_pieces(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of pieces per side n must be a positive int, got {n!r}")


def _check_4d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")


def tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """Split each image of ``x`` into n*n tiles, piece-major: (B,C,H,W) -> (n*n*B, C, H/n, W/n)."""
    _check_pieces(n)
    _check_4d("x", x)
    b, c, h, w = x.shape
    if h % n or w % n:
        raise ValueError(f"tile: H and W must be divisible by n={n}, got x of shape {tuple(x.shape)} (H={h}, W={w})")
    th, tw = h // n, w // n
    # (B, C, i, th, j, tw) -> (i, j, B, C, th, tw): piece p = i*n + j at index p*B + b.
    return x.reshape(b, c, n, th, n, tw).permute(2, 4, 0, 1, 3, 5).reshape(n * n * b, c, th, tw)


def merge(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`tile`: (n*n*B, C, h, w) -> (B, C, n*h, n*w)."""
    _check_pieces(n)
    _check_4d("tiles", t)
    nb, c, th, tw = t.shape
    if nb % (n * n):
        raise ValueError(
            f"merge: the tile batch {nb} (tiles of shape {tuple(t.shape)}) is not a multiple of n*n={n * n}"
        )
    b = nb // (n * n)
    return t.reshape(n, n, b, c, th, tw).permute(2, 3, 0, 4, 1, 5).reshape(b, c, n * th, n * tw)


def make_cam(x: torch.Tensor, eps: float = CAM_EPS) -> torch.Tensor:
    """relu(x - eps) / (max over (h, w) of relu(x) + eps), per (b, c)."""
    _check_4d("x", x)
    peak = F.relu(x).amax(dim=(2, 3), keepdim=True)
    return F.relu(x - eps) / (peak + eps)


def alpha_at(step: float, total_steps: float, alpha_max: float = 4.0, schedule: float = 0.5) -> float:
    """Weight of the reconstruction loss: a linear ramp over the first ``schedule`` of training."""
    if total_steps <= 0:
        raise ValueError(f"alpha_at: total_steps must be positive, got {total_steps}")
    if schedule <= 0:
        return float(alpha_max)
    return float(min(alpha_max * step / (total_steps * schedule), alpha_max))


@dataclass(frozen=True)
class PuzzleSpec:
    """The settings of the reconstruction loss and the Puzzle-CAM terms: the one place their defaults live.

    Every backend takes one (``puzzlecam.ops``, this module's reference); the trainer builds it from the
    ``puzzle`` section of the config (:meth:`from_config`). Checked when made: a bad value is a ValueError
    naming the field."""

    n: int = 2  # pieces per side
    level: str = "feature"  # "feature" (raw maps) | "cam" (make_cam of both)
    kind: str = "l1"  # "l1" | "l2"
    reduction: str = "masking"  # the original's re_loss_option: "masking" | "selection" | "none"
    with_conf: bool = False  # the Shannon-entropy term of the tiles' logits (0 otherwise)

    def __post_init__(self):
        _check_pieces(self.n)
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.reduction, str) or self.reduction not in RE_REDUCTIONS:
            raise ValueError(f"reduction must be one of {RE_REDUCTIONS}, got {self.reduction!r}")

    @classmethod
    def from_config(cls, puzzle_cfg) -> PuzzleSpec:
        """From the config's ``puzzle`` section (num_pieces, level, kind, re_reduction, conf_weight)."""
        p = puzzle_cfg
        return cls(p.num_pieces, p.level, p.kind, p.re_reduction, p.conf_weight > 0)

    @property
    def masking(self) -> bool:
        """The kernels' flag: reduction "masking" (else "none"; "selection" is the reference's only)."""
        return self.reduction == "masking"


DEFAULT_SPEC = PuzzleSpec()


def check_loss_args(cam: torch.Tensor, cam_tiles: torch.Tensor, labels: torch.Tensor, spec: PuzzleSpec) -> None:
    """Validate the arguments shared by every reconstruction-loss backend (clear ValueErrors)."""
    if not isinstance(spec, PuzzleSpec):
        raise TypeError(f"spec must be a puzzlecam.puzzle.PuzzleSpec, got {type(spec).__name__}")
    n = spec.n
    _check_4d("cam", cam)
    _check_4d("cam_tiles", cam_tiles)
    b, c, h, w = cam.shape
    nb, tc, th, tw = cam_tiles.shape
    if nb % (n * n):
        raise ValueError(f"cam_tiles batch {nb} (shape {tuple(cam_tiles.shape)}) is not a multiple of n*n={n * n}")
    merged_shape = (nb // (n * n), tc, th * n, tw * n)
    if merged_shape != (b, c, h, w):
        raise ValueError(
            f"merged tiles have shape {merged_shape} (from cam_tiles {tuple(cam_tiles.shape)}, n={n}) "
            f"but cam has shape {tuple(cam.shape)}"
        )
    if tuple(labels.shape) != (b, c):
        raise ValueError(
            f"labels must have shape (B, C)={(b, c)} to match cam {tuple(cam.shape)}, got {tuple(labels.shape)}"
        )


def reconstruction_loss(
    cam: torch.Tensor, cam_tiles: torch.Tensor, labels: torch.Tensor, spec: PuzzleSpec = DEFAULT_SPEC
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_re and the merged map's GAP logits.

    Returns ``(re_loss, merged_logits)`` with ``re_loss`` a scalar and ``merged_logits`` =
    GAP(merge(cam_tiles, spec.n)) of shape (B, C), both in :func:`compute_dtype`. ``spec.reduction``:

    * "masking": mean over all B*C*h*w elements of err * label (masked ones count in the divisor);
    * "selection": per image, the mean of err over the maps of its labelled classes (label != 0),
      then the mean over the B images; an image without labels adds 0 (the original divides 0 by 0);
    * "none": mean of err over all elements.
    """
    check_loss_args(cam, cam_tiles, labels, spec)
    dtype = compute_dtype(cam, cam_tiles)
    full = cam.to(dtype)
    merged = merge(cam_tiles, spec.n).to(dtype)
    merged_logits = merged.mean(dim=(2, 3))
    if spec.level == "cam":
        full, merged = make_cam(full), make_cam(merged)
    diff = full - merged
    err = diff.abs() if spec.kind == "l1" else diff * diff
    if spec.reduction == "none":
        return err.mean(), merged_logits
    if spec.reduction == "masking":
        return (err * labels.to(dtype)[:, :, None, None]).mean(), merged_logits
    selected = (labels != 0).to(dtype)
    per_image_sum = (err * selected[:, :, None, None]).sum(dim=(1, 2, 3))
    per_image_count = selected.sum(dim=1) * (err.shape[2] * err.shape[3])
    return (per_image_sum / per_image_count.clamp_min(1)).mean(), merged_logits


def gap(cam: torch.Tensor) -> torch.Tensor:
    """Global average pooling of class maps (B, C, h, w) -> logits (B, C), in :func:`compute_dtype`."""
    return cam.to(compute_dtype(cam)).mean(dim=(2, 3))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss averaged over the batch (fp32, float64 for float64 logits)."""
    if logits.shape != labels.shape:
        raise ValueError(f"labels must have the shape of the logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    dtype = compute_dtype(logits)
    return F.multilabel_soft_margin_loss(logits.to(dtype), labels.to(dtype))


def shannon_entropy_loss(logits: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """-sum_c v log(v + eps) with v = sigmoid(logits), averaged over the rows (the original's conf loss)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    v = torch.sigmoid(logits.to(compute_dtype(logits)))
    return -(v * torch.log(v + eps)).sum(dim=1).mean()


class PuzzleLosses(NamedTuple):
    cls: torch.Tensor
    pcls: torch.Tensor
    re: torch.Tensor
    conf: torch.Tensor  # 0 unless asked for


def combine_losses(
    cam: torch.Tensor,
    cam_tiles: torch.Tensor,
    labels: torch.Tensor,
    re: torch.Tensor,
    merged_logits: torch.Tensor,
    spec: PuzzleSpec,
) -> PuzzleLosses:
    """The four terms from a reconstruction loss and its merged logits (shared by every backend)."""
    cls = classification_loss(gap(cam), labels)
    conf = (
        shannon_entropy_loss(gap(cam_tiles)) if spec.with_conf else torch.zeros((), dtype=cls.dtype, device=cls.device)
    )
    return PuzzleLosses(cls=cls, pcls=classification_loss(merged_logits, labels), re=re, conf=conf)


def puzzle_losses(
    cam: torch.Tensor, cam_tiles: torch.Tensor, labels: torch.Tensor, spec: PuzzleSpec = DEFAULT_SPEC
) -> PuzzleLosses:
    """The Puzzle-CAM terms: L_cls on GAP(cam), L_pcls on GAP(merged tiles), L_re, and (``spec.with_conf``)
    the Shannon-entropy loss of the tiles' logits GAP(cam_tiles) (a zero scalar otherwise)."""
    re, merged_logits = reconstruction_loss(cam, cam_tiles, labels, spec)
    return combine_losses(cam, cam_tiles, labels, re, merged_logits, spec)


# ---------------------------------------------------------------------------------------------
# Inference fusion (docs/inference.md)


def strided_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Size of a map at ``stride``: ((H-1)//s + 1, (W-1)//s + 1)."""
    h, w = size
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def strided_up_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The stride-``stride`` size scaled back up: strided_size * stride (>= the original size)."""
    h, w = strided_size(size, stride)
    return h * stride, w * stride


def multiscale_cam(
    maps: list[torch.Tensor],
    flipped_maps: list[torch.Tensor] | None,
    keys: torch.Tensor,
    image_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse one image's multi-scale (and flipped) class maps into its normalized CAMs.

    ``maps[s]`` is the network's raw output (C, h_s, w_s) at scale s; ``flipped_maps[s]`` (or None)
    the output for the horizontally flipped image at the same scale. ``keys`` (K,) are the indices
    of the image's labelled classes; ``image_size`` is (H, W) of the original image.

    Per scale: relu, add the flipped pass flipped back, resize bilinearly (align_corners=False) to
    the stride-4 size and to the stride-16 up size; sum over scales; crop the high-resolution sum to
    (H, W); keep the labelled classes; divide each class map by (its max + 1e-5).
    Returns ``(cam, hr_cam)``: (K, (H-1)//4+1, (W-1)//4+1) and (K, H, W), fp32.
    """
    if len(maps) == 0:
        raise ValueError("multiscale_cam: no scale maps given")
    if flipped_maps is not None and len(flipped_maps) != len(maps):
        raise ValueError(f"multiscale_cam: {len(maps)} scale maps but {len(flipped_maps)} flipped maps")
    height, width = image_size
    small = strided_size((height, width), 4)
    up = strided_up_size((height, width), 16)
    keys = keys.to(device=maps[0].device, dtype=torch.long)
    cam = hr = None
    for s, m in enumerate(maps):
        if m.dim() != 3:
            raise ValueError(f"multiscale_cam: scale {s} map must be (C, h, w), got shape {tuple(m.shape)}")
        a = F.relu(m.float())
        if flipped_maps is not None:
            f = flipped_maps[s]
            if f.shape != m.shape:
                raise ValueError(
                    f"multiscale_cam: scale {s} flipped map shape {tuple(f.shape)} differs from {tuple(m.shape)}"
                )
            a = a + F.relu(f.float()).flip(-1)
        a = a[None]
        c = F.interpolate(a, small, mode="bilinear", align_corners=False)[0]
        h = F.interpolate(a, up, mode="bilinear", align_corners=False)[0]
        cam = c if cam is None else cam + c
        hr = h if hr is None else hr + h
    hr = hr[:, :height, :width]
    cam, hr = cam[keys], hr[keys]
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + CAM_EPS)
    hr = hr / (hr.amax(dim=(1, 2), keepdim=True) + CAM_EPS)
    return cam, hr


# ---------------------------------------------------------------------------------------------
# Input preparation (docs/data.md: the batch layout; docs/kernels.md: ops.prepare_inputs)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_prepare_args(images: torch.Tensor, valid: torch.Tensor, n: int) -> None:
    """Validate the arguments shared by every prepare_inputs backend (clear errors)."""
    _check_pieces(n)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(
            f"prepare_inputs: images must be a uint8 tensor (B, H, W, 3), got {getattr(images, 'dtype', type(images))}"
        )
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"prepare_inputs: images must be (B, H, W, 3) RGB, got shape {tuple(images.shape)}")
    b, h, w, _ = images.shape
    if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != (b, 2) or valid.dtype.is_floating_point:
        raise ValueError(
            f"prepare_inputs: valid must be an integer tensor (B, 2)={(b, 2)} of (valid_h, valid_w), got "
            f"{tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__}"
            f"{' ' + str(valid.dtype) if isinstance(valid, torch.Tensor) else ''}"
        )
    if h % n or w % n:
        raise ValueError(
            f"prepare_inputs: H and W must be divisible by n={n}, got images of shape {tuple(images.shape)}"
        )


def prepare_inputs(
    images: torch.Tensor,
    valid: torch.Tensor,
    n: int,
    dtype: torch.dtype,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, H, W, 3) images -> (x (B, 3, H, W), tile(x, n)) in ``dtype``.

    ImageNet normalization ``(v/255 - mean)/std`` computed in fp32, zero outside each image's valid
    region ``[0:valid_h, 0:valid_w]``, then cast to ``dtype``; both outputs channels_last if asked.
    """
    check_prepare_args(images, valid, n)
    b, h, w, _ = images.shape
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    valid = valid.to(images.device)
    rows = torch.arange(h, device=images.device)[None, :, None] < valid[:, 0, None, None]
    cols = torch.arange(w, device=images.device)[None, None, :] < valid[:, 1, None, None]
    x = torch.where((rows & cols)[:, None], x, torch.zeros((), device=images.device)).to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format), tile(x, n).contiguous(memory_format=memory_format)
