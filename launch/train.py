"""Entry point: `deepspeed launch/train.py ...`, `torchrun ... launch/train.py ...` or `python launch/train.py ...`.

Everything lives in puzzlecam.train; see `python launch/train.py --help` and docs/training.md.
"""

import os
import sys

# Run from a source checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from puzzlecam.train import main

if __name__ == "__main__":
    sys.exit(main())
