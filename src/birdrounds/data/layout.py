"""Reading and validating a BirdCLEF-2025-style data folder: tables, class list, audio paths."""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from birdrounds.rules import ON_MISSING_FILE  # noqa: F401  (the loader reads it; its home is rules)

log = logging.getLogger(__name__)

TRAIN_COLUMNS = (
    "primary_label", "secondary_labels", "type", "filename", "collection", "rating", "url",
    "latitude", "longitude", "scientific_name", "common_name", "author", "license",
)
# Columns the pipeline cannot work without; the rest are carried along when present.
TRAIN_REQUIRED = ("primary_label", "filename")
TAXONOMY_REQUIRED = ("primary_label", "scientific_name")
AUDIO_SUFFIXES = (".ogg", ".flac", ".wav", ".mp3")
# `data.on_missing_file`: a listed audio file that does not exist is skipped with a warning, or stops the load.


class LayoutError(ValueError):
    """A data folder or table that cannot be used; the message names the file and the problem."""


# Where each table and folder lies under the data root unless `data.<key>` names it (the competition layout).
DEFAULT_PATHS = {
    "train_csv": "train.csv", "taxonomy_csv": "taxonomy.csv", "sample_submission": "sample_submission.csv",
    "train_audio_dir": "train_audio", "soundscapes_dir": "train_soundscapes",
    "val_soundscapes_dir": "val_soundscapes", "val_solution": "val_solution.csv",
}


def data_path(root: str | Path, key: str, value: str | Path | None = None) -> Path:
    """`value` as a path, or where the competition layout puts `key` (a DEFAULT_PATHS key) under `root`."""
    return Path(value) if value else Path(root) / DEFAULT_PATHS[key]


@dataclass
class BirdCLEFData:
    """Validated tables and paths of one BirdCLEF-style data folder."""

    root: Path
    classes: list[str]
    train: pd.DataFrame  # train.csv + parsed secondary_labels + absolute `path`
    taxonomy: pd.DataFrame
    soundscapes: list[Path]
    val_soundscapes: list[Path] = field(default_factory=list)
    val_solution: pd.DataFrame | None = None
    missing_files: list[str] = field(default_factory=list)
    unknown_secondary: int = 0
    paths: dict[str, Path] = field(default_factory=dict)  # DEFAULT_PATHS key -> the table or folder read


def parse_label_list(value: object) -> list[str]:
    """Parse a secondary_labels cell ("['a', 'b']", "[]", "a b", NaN) into a list of labels."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    text = str(value).strip()
    if not text or text == "[]":
        return []
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise LayoutError(f"cannot parse secondary_labels cell {text!r}") from err
        return [str(v) for v in parsed if str(v)]
    return text.split()


def read_table(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """Read a CSV and check it has the required columns, naming the file on failure."""
    if not path.is_file():
        raise LayoutError(f"{what} not found: {path}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LayoutError(f"{what} {path} is not a readable CSV: {err}") from err
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise LayoutError(f"{what} {path} lacks required column(s) {missing}")
    return table


def read_classes(sample_submission: Path) -> list[str]:
    """The class list: sample_submission.csv's columns after row_id, in file order."""
    header = read_table(sample_submission, ("row_id",), "sample_submission").columns
    classes = [str(c) for c in header if c != "row_id"]
    if not classes:
        raise LayoutError(f"sample_submission {sample_submission} has no class columns")
    if len(set(classes)) != len(classes):
        raise LayoutError(f"sample_submission {sample_submission} repeats class columns")
    return classes


def prepare_train_table(
    table: pd.DataFrame,
    audio_dir: Path,
    classes: list[str],
    source: Path,
    on_missing_file: str = "warn",
) -> tuple[pd.DataFrame, list[str], int]:
    """Validate labels, parse secondary labels, resolve audio paths; return (table, missing, n_unknown_secondary)."""
    known = set(classes)
    table = table.copy()
    table["primary_label"] = table["primary_label"].astype(str)
    bad = sorted(set(table["primary_label"]) - known)
    if bad:
        raise LayoutError(f"{source}: primary_label(s) not in the class list: {bad[:10]}")
    secondary = table.get("secondary_labels", pd.Series([[]] * len(table), index=table.index))
    parsed = [parse_label_list(v) for v in secondary]
    # Secondary labels outside the class list (other taxa) are dropped, as the competition's were.
    n_unknown = sum(1 for labels in parsed for s in labels if s not in known)
    table["secondary_labels"] = [[s for s in labels if s in known] for labels in parsed]
    if "rating" not in table.columns:
        table["rating"] = 0.0
    table["path"] = [str((audio_dir / f).resolve()) for f in table["filename"].astype(str)]
    exists = table["path"].map(lambda p: Path(p).is_file())
    missing = table.loc[~exists, "filename"].astype(str).tolist()
    if missing:
        if on_missing_file == "error":
            raise LayoutError(f"{source}: {len(missing)} listed audio file(s) missing, e.g. {audio_dir / missing[0]}")
        log.warning("%s: skipping %d listed audio file(s) that do not exist, e.g. %s",
                    source, len(missing), audio_dir / missing[0])
        table = table.loc[exists]
    return table.reset_index(drop=True), missing, n_unknown


def list_audio(folder: Path) -> list[Path]:
    """Audio files directly inside a folder, sorted; empty when the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)


def read_solution(path: Path, classes: list[str]) -> pd.DataFrame:
    """Read a Kaggle-format solution (row_id + one 0/1 column per class) and check its columns."""
    solution = read_table(path, ("row_id",), "validation solution")
    missing = [c for c in classes if c not in solution.columns]
    if missing:
        raise LayoutError(f"validation solution {path} lacks class column(s) {missing[:10]}")
    return solution[["row_id", *classes]]


def load_birdclef(
    root: str | Path,
    train_csv: str | Path | None = None,
    taxonomy_csv: str | Path | None = None,
    sample_submission: str | Path | None = None,
    train_audio_dir: str | Path | None = None,
    soundscapes_dir: str | Path | None = None,
    val_soundscapes_dir: str | Path | None = None,
    val_solution: str | Path | None = None,
    on_missing_file: str = "warn",
) -> BirdCLEFData:
    """Load and validate a BirdCLEF folder; paths default to the competition layout under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"data root does not exist: {root}")
    ON_MISSING_FILE.check("data.on_missing_file", on_missing_file, LayoutError)
    given = {"train_csv": train_csv, "taxonomy_csv": taxonomy_csv, "sample_submission": sample_submission,
             "train_audio_dir": train_audio_dir, "soundscapes_dir": soundscapes_dir,
             "val_soundscapes_dir": val_soundscapes_dir, "val_solution": val_solution}
    paths = {key: data_path(root, key, value) for key, value in given.items()}
    classes = read_classes(paths["sample_submission"])
    taxonomy = read_table(paths["taxonomy_csv"], TAXONOMY_REQUIRED, "taxonomy")
    untaxed = sorted(set(classes) - set(taxonomy["primary_label"].astype(str)))
    if untaxed:
        raise LayoutError(f"taxonomy {paths['taxonomy_csv']} lacks class(es) {untaxed[:10]}")
    train, missing, n_unknown = prepare_train_table(
        read_table(paths["train_csv"], TRAIN_REQUIRED, "train.csv"), paths["train_audio_dir"],
        classes, paths["train_csv"], on_missing_file)
    solution = read_solution(paths["val_solution"], classes) if paths["val_solution"].is_file() else None
    return BirdCLEFData(
        root=root, classes=classes, train=train, taxonomy=taxonomy,
        soundscapes=list_audio(paths["soundscapes_dir"]),
        val_soundscapes=list_audio(paths["val_soundscapes_dir"]) if solution is not None else [],
        val_solution=solution, missing_files=missing, unknown_secondary=n_unknown, paths=paths,
    )


def load_external(dirs: list[str | Path], classes: list[str], max_per_class: int | None = None) -> pd.DataFrame:
    """Extra labeled rows (train.csv schema, audio paths relative to their folder), e.g. from xc-download.

    Folders without a train.csv are skipped; at most `max_per_class` rows per primary label are kept,
    in file order. Rows get a `source` column naming their folder.
    """
    tables = []
    for folder in map(Path, dirs):
        table_path = folder / "train.csv"
        if not table_path.is_file():
            continue
        table, _, _ = prepare_train_table(read_table(table_path, TRAIN_REQUIRED, "external train.csv"),
                                          folder, classes, table_path)
        if max_per_class is not None:
            table = table.groupby("primary_label", sort=False).head(max_per_class)
        tables.append(table.assign(source=str(folder)))
        log.info("external data: %d rows from %s", len(tables[-1]), table_path)
    if not tables:
        return pd.DataFrame(columns=[*TRAIN_COLUMNS, "path", "source"])
    return pd.concat(tables, ignore_index=True)
