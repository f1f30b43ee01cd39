"""Bring a run folder up to a round: `python rounds/run.py round=2 [overrides]`.

Works the same under `accelerate launch --config_file configs/accelerate/<file>.yaml rounds/run.py ...`.
"""

import logging
import os
import sys

# Idle OpenMP threads yield instead of spinning: on a 2-core machine spinning workers starve the
# DataLoader processes and each other (measured 30x slower steps under load). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig

log = logging.getLogger("birdrounds")


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from birdrounds.cli import config_errors
    from birdrounds.config import error_line
    from birdrounds.rounds import run

    try:
        run(cfg)
    except config_errors() as err:
        # Bad config or bad tables: one line naming the key or file, no traceback.
        log.error("%s", error_line(err))
        sys.exit(2)


if __name__ == "__main__":
    from birdrounds.cli import exit_on_bad_overrides

    exit_on_bad_overrides("rounds/run.py", sys.argv[1:])  # a bad key: one line and exit 2, as `birdrounds`
    main()
