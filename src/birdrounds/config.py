"""Locating and composing the Hydra config tree shared by `rounds/run.py` and the `birdrounds` CLI."""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from birdrounds.contract import SCORED_CHUNK_S
from birdrounds.rules import (  # noqa: F401  (ConfigError and Rule: their home is rules, most modules import them here)
    AUGMENT_ON,
    COUNT,
    ENSEMBLE_MEMBERS,
    EXTERNAL_BACKENDS,
    ON_MISSING_FILE,
    STRATEGIES,
    STRATEGY_ARGS,
    TEACHER_KINDS,
    TRAIN_RULES,
    VALUE_RULES,
    ConfigError,
    Rule,
)


# Keys added to the config tree after runs were recorded, each with the value that does what the code did
# before the key existed (an older run folder's config lacks the key). Both readers count an absent key as
# this value: `rounds.result_config` leaves the key out of a round's hash while it holds it, so finished
# rounds stay reusable after an upgrade (a real setting still counts); `mixed_val.mixed_validation_from_config`
# rebuilds an older run's validation set with it, the set that run was scored on, not today's default.
# Read-only: readers copy the lists.
LEGACY: Mapping[str, Any] = MappingProxyType({
    "data.external.filter_min_prob": None,
    "data.augment_on": "workers",
    "data.split_seed": None,
    # SynthSpec's focal lengths, held by data/synthetic.yaml since they lost their Python defaults.
    "data.synth.focal_min_s": 5.0,
    "data.synth.focal_max_s": 30.0,
    "data.mixed_val.distance": [0.0, 0.0],
    "data.mixed_val.subtract_background": False,
    "data.mixed_val.distance_from_snr": False,
    "data.mixed_val.background_labels": None,
    "model.pretrained": False,
    # Runs made before external teachers had our own CNN as round 0.
    "teacher": {"kind": "cnn"},
})


def check_values(cfg: DictConfig) -> None:
    """Every key of `cfg` that a VALUE_RULES pattern matches, checked by its first matching rule."""
    def leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
        elif not isinstance(node, list):
            yield prefix, node

    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key, value in leaves({k: v for k, v in plain.items() if k != "hydra"}, ""):
        rule = next((rule for pattern, rule in VALUE_RULES if fnmatch.fnmatchcase(key, pattern)), None)
        if rule is not None:
            rule.check(key, value)


def legacy_under(prefix: str) -> dict[str, Any]:
    """LEGACY's entries below `prefix` (e.g. "data.mixed_val"), keyed by the rest of their key."""
    start = prefix + "."
    return {key[len(start):]: value for key, value in LEGACY.items() if key.startswith(start)}


def config_dir() -> Path:
    """The shipped config tree (`birdrounds/configs`, inside the package, so an installed copy finds it
    from any working directory), or the complete tree that $BIRDROUNDS_CONFIG_DIR names instead."""
    env = os.environ.get("BIRDROUNDS_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "configs"
    if not (path / "config.yaml").is_file():
        key = "BIRDROUNDS_CONFIG_DIR" if env else "birdrounds/configs"
        raise ConfigError(f"{key}: no config.yaml in {path}" + ("" if env else " (reinstall birdrounds)"))
    return path


def search_dirs(user_dirs: Sequence[str | Path] = ()) -> list[Path]:
    """Where config files are looked up, first match wins: the shipped tree, then the user's folders
    (`--config-dir DIR`), which add options (`experiment/mine.yaml`, `data/mydata.yaml`) beside the shipped
    ones. ConfigError naming `--config-dir` for a folder that does not exist."""
    dirs = [config_dir()]
    for entry in user_dirs:
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--config-dir: no such folder: {entry}")
        dirs.append(path)
    return dirs


def compose(overrides: Sequence[str] = (), config_name: str = "config",
            user_dirs: Sequence[str | Path] = ()) -> DictConfig:
    """Compose the config tree with command-line style overrides, outside of @hydra.main; `user_dirs` are
    the user's own config folders, searched after the shipped tree (`search_dirs`).

    An unknown key, an unknown group option or an added key (`+key=...`) that no component takes raises
    ConfigError in one line that names the override (see `check_additions`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    dirs = search_dirs(user_dirs)
    # Hydra's own way to add folders to its search path: the `hydra.searchpath` key, as an override.
    search = [f"hydra.searchpath=[{','.join(repr(f'file://{d}') for d in dirs[1:])}]"] if dirs[1:] else []
    overrides = list(overrides)
    parsed = parse_overrides(overrides)
    groups = config_groups(config_name)
    check_group_options(parsed, groups, dirs)
    with initialize_config_dir(config_dir=str(dirs[0]), version_base="1.3"):
        def without(dropped: Collection[Any]) -> DictConfig:
            return hydra_compose(config_name=config_name,
                                 overrides=search + [o.input_line for o in parsed if o not in dropped])

        try:
            cfg = hydra_compose(config_name=config_name, overrides=search + overrides)
        except ConfigCompositionException as err:
            # Where a key is unknown, the config of the same group options shows its likely spelling.
            keys = [o for o in parsed if o.key_or_group not in groups]
            raise ConfigError(composition_error(err, parsed, lambda: without(keys))) from None
        forced = [o for o in parsed if o.is_force_add()]
        before = plain_tree(without(forced)) if forced else {}
        # `++key=...` sets a key that exists and adds one that does not: only the latter is an addition.
        check_additions(cfg, [o for o in parsed if o.is_add() or (o in forced and not has_key(before, o.key_or_group))],
                        dirs)
    return cfg


def shipped_config(node: str, *overrides: str) -> DictConfig:
    """Node `node` (dotted, e.g. "data.synth") of the shipped config composed with `overrides`, still attached
    to its root so interpolations resolve; ConfigError where the node is absent or null. Works inside a run
    under @hydra.main too (compose needs Hydra's global state to itself: it is set aside meanwhile)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    running = get_gh_backup() if GlobalHydra.instance().is_initialized() else None
    if running is not None:
        GlobalHydra.instance().clear()
    try:
        section = OmegaConf.select(compose(list(overrides)), node)
    finally:
        if running is not None:
            restore_gh_from_backup(running)
    if not isinstance(section, DictConfig):
        raise ConfigError(f"{node}: no such section in the shipped config with {list(overrides)}")
    return section


def shipped(node: str, *overrides: str, **changes: Any) -> Any:
    """What `node` of the shipped config (composed with `overrides`) builds, by `hydra.utils.instantiate` as a
    run builds it, with `changes` as keyword overrides: the YAML tree is where the defaults live, e.g.
    `shipped("data.synth", "data=synthetic", n_species=4)` or `shipped("train", "train=smoke", epochs=1)`.
    ConfigError for a node without `_target_` (nothing to build; see `shipped_config`)."""
    from hydra.utils import instantiate

    section = shipped_config(node, *overrides)
    if "_target_" not in section:
        raise ConfigError(f"{node}: has no _target_, nothing to build (read its values with shipped_config)")
    return instantiate(section, **changes)


# ---------------------------------------------------------------- overrides: unknown keys and options, additions

# Keys that `hydra.utils.instantiate` reads itself, so any component's node may take them.
INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


def parse_overrides(overrides: Sequence[str]) -> list[Any]:
    """Hydra's parse of each override; ConfigError naming the first one that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as err:
            reasons = [r for r in str(err).splitlines() if r and not r.startswith(("Error parsing", "See https"))]
            reason = reasons[0] if reasons else "key=value expected"
            raise ConfigError(f"{redact_argv([line])[0]}: not an override ({reason})") from None
    return parsed


def shown(override: Any) -> str:
    """An override as typed, its value redacted where the key names a secret (errors reach logs)."""
    return redact_argv([override.input_line])[0]


def config_groups(config_name: str = "config") -> set[str]:
    """The config groups the root config's defaults list selects from (data, model, pseudo, ...)."""
    defaults = OmegaConf.load(config_dir() / f"{config_name}.yaml").get("defaults") or []
    return {str(key).split("@")[0] for entry in defaults if isinstance(entry, Mapping) for key in entry}


def group_options(group: str, dirs: Sequence[Path] | None = None) -> list[str]:
    """The selectable options of config group `group` in `dirs` (default: the shipped tree); `_`-prefixed
    files (e.g. pseudo/_base.yaml) are what the options share, not options."""
    return sorted({p.stem for d in dirs or [config_dir()] for p in (d / group).glob("*.yaml")
                   if not p.stem.startswith("_")})


def check_group_options(parsed: Sequence[Any], groups: Collection[str], dirs: Sequence[Path] | None = None) -> None:
    """ConfigError for a group override whose option does not exist in `dirs`, listing the ones that do."""
    for override in parsed:
        value = None if override.is_delete() or override.is_sweep_override() else override.value()
        if override.key_or_group in groups and value is not None:
            options = group_options(override.key_or_group, dirs)
            if str(value) not in options:
                raise ConfigError(f"{shown(override)}: no such option; choose from {', '.join(options)}")


def composition_error(err: BaseException, parsed: Sequence[Any], known: Callable[[], DictConfig]) -> str:
    """One line for Hydra's composition error; an unknown key is named with its override and the closest
    existing key (from `known()`, the config without the key overrides)."""
    match = re.match(r"Could not override '([^']+)'", str(err))
    if match is None:
        return (str(err).splitlines() or [type(err).__name__])[0]
    key = match.group(1)
    line = next((shown(o) for o in parsed if o.key_or_group == key), key)
    try:
        close = difflib.get_close_matches(key, dotted_keys(plain_tree(known())), n=1, cutoff=0.75)
    except Exception:  # the suggestion is a courtesy; the error stands without it
        close = []
    return f"{line}: no such key" + (f"; did you mean {close[0]}?" if close else "")


def plain_tree(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` as plain dicts and lists, interpolations and ??? left as written."""
    return OmegaConf.to_container(cfg, resolve=False)


def dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every key of a plain config tree, as dotted paths (lists are leaves)."""
    keys = []
    for name, value in tree.items():
        keys.append(prefix + str(name))
        if isinstance(value, Mapping):
            keys += dotted_keys(value, f"{prefix}{name}.")
    return keys


_ABSENT = object()


def select_plain(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """The value at `dotted` (e.g. "data.augment.gain_p") in a plain config tree, or `default` where it is not."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def has_key(tree: Mapping[str, Any], dotted: str) -> bool:
    """Whether the plain config tree has `dotted`."""
    return select_plain(tree, dotted, _ABSENT) is not _ABSENT


def check_additions(cfg: DictConfig, additions: Sequence[Any], dirs: Sequence[Path] | None = None) -> None:
    """ConfigError for an added key (`+key=...`) that nothing would read.

    Code reads the keys the YAML files hold; what else gets read is a component's arguments: below a
    node with `_target_`, the argument's name must be one its target takes (or it takes **kwargs);
    deeper keys are the contents of that argument. Anything else (a top-level key, a key in a plain
    section such as `pseudo.student_train`, a whole new config group) would be stored in the round's
    config, change its hash and be read by no one.
    """
    tree = plain_tree(cfg)
    for override in additions:
        key = override.key_or_group
        if key.startswith("hydra."):
            continue
        if any((d / key.replace(".", "/")).is_dir() for d in dirs or [config_dir()]):
            raise ConfigError(f"{shown(override)}: adds config group {key!r}, which no component reads")
        problem = addition_problem(tree, key.split("."))
        if problem:
            raise ConfigError(f"{shown(override)}: {problem}")


def addition_problem(tree: Mapping[str, Any], parts: Sequence[str]) -> str | None:
    """Why added key `parts` would be read by no component, or None when a component takes it."""
    nodes: list[Any] = [tree]
    for part in parts[:-1]:
        nodes.append(nodes[-1].get(part) if isinstance(nodes[-1], Mapping) else None)
    # The nearest component at or above the key's parent; the key below it is the argument it receives.
    for depth in range(len(parts) - 1, -1, -1):
        node = nodes[depth]
        if isinstance(node, Mapping) and "_target_" in node:
            return argument_problem(str(node["_target_"]), parts[depth])
    return "no such key, and no component would read an added one (only a node with _target_ takes new keys: its arguments)"


def argument_problem(target: str, name: str) -> str | None:
    """None when `target` (a `_target_` path) takes keyword argument `name`, else why not.

    A target that cannot be looked up here is let through: instantiate reports it where it is built.
    """
    import inspect

    from hydra.utils import get_object

    if name in INSTANTIATE_KEYS:
        return None
    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # an interpolated or unimportable target, or one without a signature
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == name and p.kind in named) for p in params):
        return None
    return f"{target} takes no argument {name!r}, so nothing would read it"


def require(cfg: DictConfig, key: str, check, message: str) -> None:
    """Raise ConfigError naming `key` when it is missing or `check(value)` is false."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key}: required value is missing ({message})") from None
    Rule(check, message).check(key, value)


def error_line(err: BaseException) -> str:
    """One line for a bad-config or bad-input error, with the reason (Hydra puts it on a later line).

    A failed `instantiate` reads "Error in call to target 'X':\nConfigError('train.epochs: must be an integer
    >= 1, got -1')\nfull_key: train"; this gives "train: train.epochs: must be an integer >= 1, got -1".
    """
    lines = str(err).splitlines() or [type(err).__name__]
    if len(lines) > 1 and lines[0].startswith("Error in call to target"):
        key = next((line.removeprefix("full_key: ") for line in lines if line.startswith("full_key: ")), None)
        reason = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else lines[1]
        return f"{key}: {reason}" if key else reason
    return lines[0]


def validate(cfg: DictConfig, may_generate: bool = False) -> None:
    """Check the values that would otherwise fail deep inside a long run. `may_generate`: the command is
    `birdrounds synth`, which generates the synthetic data wherever `data.root` says."""
    require(cfg, "data.root", lambda v: bool(v), "set the data folder, e.g. data.root=/path/to/birdclef-2025")
    check_values(cfg)
    require(cfg, "data.sample_rate_hz", lambda v: isinstance(v, int) and v > 0, "must be a positive integer")
    require(cfg, "data.window_s", lambda v: isinstance(v, (int, float)) and v > 0, "must be a positive number of seconds")
    require(cfg, "data.n_folds", lambda v: isinstance(v, int) and v >= 2, "must be an integer >= 2")
    require(cfg, "data.fold", lambda v: isinstance(v, int) and 0 <= v < cfg.data.n_folds, f"must be in [0, data.n_folds={cfg.data.n_folds})")
    if OmegaConf.select(cfg, "data.split_seed") is not None:
        require(cfg, "data.split_seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "must be an integer >= 0 or null (null: the run's seed)")
    for key in ("data.mixed_val.subtract_background", "data.mixed_val.distance_from_snr"):
        if OmegaConf.select(cfg, key) is not None:
            require(cfg, key, lambda v: isinstance(v, bool), "must be true or false")
    if OmegaConf.select(cfg, "data.augment_on") is not None:
        require(cfg, "data.augment_on", lambda v: v in AUGMENT_ON, f"must be one of {AUGMENT_ON}")
    require(cfg, "data.on_missing_file", ON_MISSING_FILE.ok, ON_MISSING_FILE.text)
    for key in ("data.external.loss_weight", "data.external.sample_weight"):
        if OmegaConf.select(cfg, key) is not None:
            require(cfg, key, lambda v: isinstance(v, (int, float)) and v >= 0, "must be a number >= 0")
    if OmegaConf.select(cfg, "data.external.filter_min_prob") is not None:
        require(cfg, "data.external.filter_min_prob", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
                "must be null or a probability in [0, 1]")
    require(cfg, "round", lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer")
    require(cfg, "recompute_from", lambda v: v is None or (isinstance(v, int) and v >= 0),
            "must be null or a round number")
    require(cfg, "control", lambda v: isinstance(v, bool), "must be true or false")
    for name, rule in TRAIN_RULES.items():
        if OmegaConf.select(cfg, f"train.{name}") is not None:
            require(cfg, f"train.{name}", rule.ok, rule.text)
    require(cfg, "data.sampler.samples_per_epoch", lambda v: v is None or v == "auto" or COUNT.ok(v),
            "must be auto, null (one per train.csv row) or an integer >= 1")
    backbone = OmegaConf.select(cfg, "model.backbone")
    if backbone is not None:
        import timm

        require(cfg, "model.backbone", timm.is_model, "unknown timm model (timm.list_models('*name*') lists them)")
        require(cfg, "model.pretrained_path", lambda v: v is None or Path(v).is_file(), "weights file not found")
        if OmegaConf.select(cfg, "model.pretrained") is not None:
            require(cfg, "model.pretrained", lambda v: isinstance(v, bool), "must be true or false")
    if OmegaConf.select(cfg, "teacher") is not None:
        require(cfg, "teacher.kind", lambda v: v in TEACHER_KINDS, f"must be one of {', '.join(TEACHER_KINDS)}")
        if cfg.teacher.kind != "cnn":
            require(cfg, "teacher.external.backend", lambda v: v in EXTERNAL_BACKENDS,
                    f"must be {' or '.join(EXTERNAL_BACKENDS)}")
            require(cfg, "teacher.external.path", lambda v: v is None or Path(v).is_file(), "model file not found")
        if cfg.teacher.kind == "ensemble":
            require(cfg, "teacher.member", lambda v: v in ENSEMBLE_MEMBERS, f"must be {' or '.join(ENSEMBLE_MEMBERS)}")
        # teacher.external.threads, teacher.weight and teacher.probe's numbers: VALUE_RULES (check_values)
    if cfg.round > 0:
        strategy = OmegaConf.select(cfg, "pseudo.mixing.strategy")
        if strategy is not None:
            require(cfg, "pseudo.mixing.strategy", lambda v: v in STRATEGIES, f"must be one of {', '.join(STRATEGIES)}")
            for key in STRATEGY_ARGS[strategy]:
                require(cfg, f"pseudo.mixing.{key}", lambda v: v is not None,
                        f"strategy {strategy} needs it (add +pseudo.mixing.{key}=<value>)")
        require(cfg, "pseudo.student_init", lambda v: v in ("teacher", "scratch"), "must be 'teacher' or 'scratch'")
        require(cfg, "pseudo.window_s", lambda v: isinstance(v, (int, float)) and v >= SCORED_CHUNK_S,
                f"must be at least the {SCORED_CHUNK_S:g}-s scored chunk")
    if not may_generate:
        check_generated_root(cfg)


def check_generated_root(cfg: DictConfig) -> None:
    """A run generates the synthetic data by itself only inside the project home (`paths.root`), where the
    default `data.root` is: a missing or empty `data.root` elsewhere is taken for a typo, not a place to
    write a data set (`birdrounds synth` generates it anywhere on purpose)."""
    if OmegaConf.select(cfg, "data.synth") is None:
        return
    root = Path(cfg.data.root)
    if root.is_dir() and any(root.iterdir()):
        return  # data already there (generate() checks that it is the configured one)
    home = Path(cfg.paths.root).resolve()
    if root.resolve().is_relative_to(home):
        return
    raise ConfigError(f"data.root: no data at {root}, which is outside the project home {home} (paths.root); "
                      f"check the path, or generate the synthetic data there on purpose with "
                      f"`birdrounds synth data.root={root}`")


# ---------------------------------------------------------------- secrets kept out of records

REDACTED = "***REDACTED***"
# A config key holds a secret when the last word of its name (split at "_", "-" or ".") is one of these:
# api_key, key, token, access_token, password, db_password, secret, client_secret, credentials ...
SECRET_WORDS = frozenset({"key", "apikey", "token", "password", "passwd", "secret", "credential", "credentials"})


def is_secret_name(name: object) -> bool:
    """True for a config key that names a credential (see SECRET_WORDS)."""
    return re.split(r"[_.\-]", str(name).lower())[-1] in SECRET_WORDS


def redact_secrets(config: Any) -> Any:
    """A resolved plain copy of `config` with every set secret value replaced by REDACTED.

    Unset values (null or empty) are kept, so a record still shows that no secret was given. Use it
    wherever a config is persisted or handed to a tracker; the live config keeps the real value.
    """
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {k: REDACTED if is_secret_name(k) and v not in (None, "") else redact_secrets(v)
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact_secrets(v) for v in config]
    return config


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the value of every secret override (`xc.api_key=...`) redacted."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        secret = sep and value and is_secret_name(name.lstrip("+~-"))
        out.append(f"{name}={REDACTED}" if secret else arg)
    return out


@contextmanager
def redacted_argv() -> Iterator[None]:
    """Redact secret overrides in `sys.argv` meanwhile (wandb records the command line at init)."""
    saved = sys.argv
    sys.argv = redact_argv(saved)
    try:
        yield
    finally:
        sys.argv = saved
