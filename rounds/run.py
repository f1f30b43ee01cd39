"""Bring a run folder up to a round: `python rounds/run.py round=2 [overrides]` (the same as `birdrounds run`).

Works the same under `accelerate launch --config_file configs/accelerate/<file>.yaml rounds/run.py ...`.
"""

import sys

from birdrounds.cli import run_rounds  # sets OMP_WAIT_POLICY before torch loads

if __name__ == "__main__":
    run_rounds(sys.argv[1:], prog="rounds/run.py")
