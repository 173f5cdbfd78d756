"""Triton kernels of puzzlecam, installed as ``puzzlecam.kernels`` (never as a top-level module).

One file per fused op, each with its kernels, launcher and autograd.Function:

* :mod:`.tile_merge` -- ``tile`` / ``merge`` of feature maps (each the other's backward);
* :mod:`.fused_reconstruction_loss` -- fused L_re + merged GAP logits, forward and backward;
* :mod:`.fused_prepare_inputs` -- uint8 NHWC images -> normalized batch and its tiles in one pass;
* :mod:`.fused_affinity_loss` -- AffinityNet loss sums and counts from the edge and label maps, with
  the edge gradient, never building the (B, directions, pixels) affinities.

Importing this package imports triton. On a machine without a GPU the kernels run only through the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is first imported).
"""

import os

# triton.jit picks interpreted or compiled kernels when they are defined, i.e. at this import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .fused_affinity_loss import affinity_sums  # noqa: E402
from .fused_prepare_inputs import prepare_inputs  # noqa: E402
from .fused_reconstruction_loss import reconstruction_loss  # noqa: E402
from .tile_merge import merge, tile  # noqa: E402

__all__ = ["INTERPRETED", "affinity_sums", "merge", "prepare_inputs", "reconstruction_loss", "tile"]
