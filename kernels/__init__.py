"""Triton kernels of puzzlecam, installed as ``puzzlecam.kernels`` (never as a top-level module).

One file per fused op, each with its kernels and launchers:

* :mod:`.tile_merge` -- ``tile`` / ``merge`` of feature maps (each the other's backward);
* :mod:`.fused_reconstruction_loss` -- fused L_re + merged GAP logits, forward and backward;
* :mod:`.fused_prepare_inputs` -- uint8 NHWC images -> normalized batch and its tiles in one pass;
* :mod:`.fused_affinity_loss` -- AffinityNet loss sums and counts from the edge and label maps, with
  the edge gradient, never building the (B, directions, pixels) affinities.

Importing this package registers them as the ops ``torch.ops.puzzlecam.triton_<op>`` (``torch.library.triton_op``
with their autograd; signatures in puzzlecam.library.SCHEMAS), which puzzlecam.ops calls. It imports triton. On a
machine without a GPU the kernels run only through the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported).
"""

import os

# triton.jit picks interpreted or compiled kernels when they are defined, i.e. at this import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

from puzzlecam import library  # noqa: E402

from . import fused_affinity_loss, fused_prepare_inputs, fused_reconstruction_loss, tile_merge  # noqa: E402

# The implementation of each op of puzzlecam.library.TRITON_OPS.
IMPLEMENTATIONS = (
    ("reconstruction_loss", fused_reconstruction_loss.forward),
    ("reconstruction_loss_backward", fused_reconstruction_loss.backward),
    ("tile", tile_merge.tile_forward),
    ("merge", tile_merge.merge_forward),
    ("prepare_inputs", fused_prepare_inputs.prepare_inputs),
    ("affinity_sums", fused_affinity_loss.forward),
    ("affinity_sums_backward", fused_affinity_loss.backward),
)
# Why the ops could not be registered (torch too old), or None.
UNREGISTERED = library.triton_ops_supported()
if UNREGISTERED is None:
    library.register_triton_ops(IMPLEMENTATIONS)

__all__ = ["INTERPRETED", "IMPLEMENTATIONS", "UNREGISTERED"]
