"""Entry point: `deepspeed launch/train.py ...`, `torchrun ... launch/train.py ...` or `python launch/train.py ...`.

Everything lives in puzzlecam.train; see `python launch/train.py --help` and docs/training.md.
"""

import logging
import os
import sys

# Run from a source checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from puzzlecam.train import main

if __name__ == "__main__":
    status = main()  # the process group is destroyed and every output written and closed by now
    # Leave without the interpreter's finalization: gloo's C++ threads can still hold tensors whose release
    # then needs the GIL of a dying interpreter, an abort ("terminate called without an active exception")
    # after a finished run, seen once on a loaded 2-core machine.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)
