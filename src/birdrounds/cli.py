"""The `birdrounds` command: thin subcommands over the library, each taking Hydra overrides."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

# Idle OpenMP threads yield instead of spinning: on a 2-core machine spinning workers starve the
# DataLoader processes and each other (measured 30x slower steps under load). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from birdrounds.config import ConfigError, compose, config_dir, error_line, redact_argv, validate
from birdrounds.data.layout import LayoutError
from birdrounds.lock import run_folder_lock

log = logging.getLogger("birdrounds")


def cmd_synth(cfg: DictConfig) -> None:
    """Generate the synthetic mini-BirdCLEF at `data.root` (no-op when it is already there)."""
    from birdrounds.data.prepare import synthesize

    if cfg.data.synth is None:
        raise ConfigError("data.synth: the selected data config has nothing to generate; use data=synthetic")
    root = synthesize(cfg.data.synth, cfg.data.root, num_workers=cfg.data.num_workers)
    print(root)


def cmd_xc_download(cfg: DictConfig) -> int:
    """Download Xeno-canto recordings of minority classes into `xc.out_dir` (xc.dry_run=true: list only).

    From the API v3, or from a local archive folder with `xc.source=DIR` (result pages as *.json and
    their audio; no API key). Prints a per-species summary; exits 1 with one line when a species failed
    (query failed after its retries, or every recording it selected failed), after keeping whatever did
    succeed; a malformed archive stops before any work with one line naming the file (exit 2).
    """
    from hydra.utils import instantiate

    from birdrounds.xeno_canto import download_xeno_canto, failure_line, format_summary

    summaries = download_xeno_canto(instantiate(cfg.xc, _convert_="all"))
    print(format_summary(summaries))
    problem = failure_line(summaries)
    if problem and any(s.species_failed for s in summaries):
        print(f"birdrounds xc-download: error: {problem}", file=sys.stderr)
        return 1
    if problem:
        print(f"birdrounds xc-download: warning: {problem}", file=sys.stderr)
    return 0


def cmd_export(cfg: DictConfig) -> None:
    """Export a round's model(s) to an ONNX package in `export.out_dir` (parity-checked against PyTorch)."""
    from birdrounds.submit import run_export

    report = run_export(cfg)
    print(Path(report["onnx"]["path"]).parent)


def cmd_predict(cfg: DictConfig) -> None:
    """Run exported model(s) over `predict.input_dir` and write `predict.output` (submission.csv)."""
    from birdrounds.submit import run_predict

    record = run_predict(cfg)
    print(record["output"])


def cmd_fetch_weights(cfg: DictConfig) -> None:
    """Download timm's pretrained weights for `model.backbone` into the Hugging Face cache (HF_HOME), so that
    runs with `model.pretrained=true` find them offline (a Kaggle notebook: attach the folder as a dataset,
    set HF_HOME to it and HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    from birdrounds.model import build_backbone, hub_id

    name = cfg.model.backbone
    build_backbone(name, pretrained=True)
    print(f"{name}: {hub_id(name)} is in {constants.HF_HUB_CACHE}")
    if not cfg.model.get("pretrained"):
        log.info("model.pretrained is false in this config: pass model.pretrained=true to train from these weights")


# A command returns its exit status, or None for 0.
COMMANDS: dict[str, tuple[Callable[[DictConfig], int | None], str]] = {
    "synth": (cmd_synth, "generate the synthetic mini-BirdCLEF dataset (data=synthetic)"),
    "xc-download": (cmd_xc_download, "download Xeno-canto recordings for minority classes (--dry-run: list only)"),
    "export": (cmd_export, "export a round's model(s) to ONNX + a standalone inference package (export.*)"),
    "fetch-weights": (cmd_fetch_weights, "download timm's pretrained weights for model.backbone into the "
                                         "Hugging Face cache, for offline runs with model.pretrained=true"),
    "predict": (cmd_predict, "write submission.csv for a folder of soundscapes with exported models (predict.*)"),
}


# Commands that write into an existing run folder: they hold its lock (birdrounds.lock) while they run.
LOCKING_COMMANDS = ("export", "predict")


def config_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad config or bad input tables: reported in one line, no traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ConfigError, LayoutError, HydraException, OmegaConfBaseException)


def exit_on_bad_overrides(prog: str, argv: Sequence[str]) -> DictConfig | None:
    """Compose and check the overrides of a @hydra.main command line (`birdrounds run`, `rounds/run.py`) first
    and, where one names an unknown key or option, adds a key nothing reads or sets a bad value, exit 2 with one
    line on stderr instead of Hydra's multi-line report (exit 1), before anything is written. Returns the
    config; None for Hydra's own requests (--help, --multirun, another primary config folder), which pass."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.multirun or args.config_path:
        return None
    try:
        cfg = compose(args.overrides, config_name=args.config_name or "config",
                      user_dirs=[args.config_dir] if args.config_dir else ())
        validate(cfg)
    except config_errors() as err:
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    return cfg


def rounds_task(cfg: DictConfig) -> None:
    """The rounds under @hydra.main: bad config or bad tables end in one line and exit 2."""
    from birdrounds.rounds import run

    try:
        run(cfg)
    except config_errors() as err:
        log.error("%s", error_line(err))  # Hydra's job log (run.log) keeps it too
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted: run the same command again to resume where it stopped")
        sys.exit(130)
    except Exception:
        # Hydra's own report of a crash lists every override, secrets included; this one redacts them.
        log.exception("the run failed (overrides: %s)", " ".join(redact_argv(sys.argv[1:])))
        sys.exit(1)


def run_rounds(argv: Sequence[str], prog: str = "birdrounds run") -> None:
    """Bring a run folder up to a round: `birdrounds run round=2 [overrides]` (and `rounds/run.py`, its
    thin script, which `accelerate launch` takes). Hydra's own command line: overrides, `--config-dir DIR`
    (the user's config folder, searched after the shipped tree), `--help`, `--cfg job`. Hydra writes the
    job's log to `<run_dir>/run.log` (hydra.job.name in config.yaml)."""
    import hydra

    cfg = exit_on_bad_overrides(prog, argv)
    sys.argv = [prog, *argv]  # hydra.main reads its command line from sys.argv
    task = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(rounds_task)
    if cfg is None:
        task()
        return
    # One writer per run folder, held from before Hydra opens the folder's run.log until the last round.
    try:
        with run_folder_lock(cfg.run_dir):
            task()
    except config_errors() as err:
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `birdrounds <command> [--config-dir DIR] [key=value ...]`, compose the config, run the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # Hydra parses its own command line
        run_rounds(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="birdrounds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="bring a run folder up to a round: teacher, pseudo-labels, students "
                               "(Hydra's command line, as rounds/run.py)")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke data.root=/data")
        p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                       help="a folder of your own config files (e.g. experiment/mine.yaml), searched after the "
                            "shipped ones; repeatable")
    # `--dry-run` is shorthand for the xc.dry_run=true override.
    if argv[:1] == ["xc-download"] and "--dry-run" in argv:
        argv = [a for a in argv if a != "--dry-run"] + ["xc.dry_run=true"]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    try:
        cfg = compose(args.overrides, user_dirs=args.config_dir)
        validate(cfg, may_generate=args.command == "synth")
        locking = args.command in LOCKING_COMMANDS and Path(cfg.run_dir).is_dir()
        with run_folder_lock(cfg.run_dir) if locking else contextlib.nullcontext():
            status = COMMANDS[args.command][0](cfg)
    except config_errors() as err:
        print(f"birdrounds {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
