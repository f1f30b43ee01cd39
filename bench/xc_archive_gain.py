"""Does the Xeno-canto extension help? Round-0 teachers with and without the synthetic minority archive.

1. generates the default synthetic dataset (if absent) under --home,
2. serves its `xc_archive/` through a local Xeno-canto API v3 look-alike on 127.0.0.1,
3. runs the real downloader (`download_xeno_canto`) against it into <home>/external_data/xeno_canto,
4. trains two round-0 teachers with `rounds/run.py` (data.external.enabled=false / true), same seed,
5. prints per-class soundscape AUC on the validation soundscapes for the extended classes.

    python bench/xc_archive_gain.py --home /tmp/xc_gain [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from birdrounds.artifacts import MODEL_FILE
from birdrounds.config import compose
from birdrounds.data.audio import AudioCache
from birdrounds.data.prepare import synthesize
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.metrics import per_class_roc_auc
from birdrounds.model import load_checkpoint
from birdrounds.xeno_canto import XCSettings, download_xeno_canto

REPO = Path(__file__).resolve().parents[1]
KEY = "local-bench-key"


def serve_archive(archive: Path) -> tuple[ThreadingHTTPServer, str]:
    """A v3-shaped API (one page per species) and the audio files of a synthetic xc_archive."""
    records = json.loads((archive / "recordings.json").read_text())
    by_species: dict[str, list[dict]] = {}
    for rec in records:
        by_species.setdefault(f"{rec['gen']} {rec['sp']}", []).append(rec)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            if url.path.startswith("/audio/"):
                self.reply(200, (archive / url.path.lstrip("/")).read_bytes())
                return
            params = dict(urllib.parse.parse_qsl(url.query))
            match = re.search(r'sp:"([^"]+)"', params.get("query", ""))
            if params.get("key") != KEY or not match:
                self.reply(401 if params.get("key") != KEY else 400, b'{"error": "bad request"}')
                return
            base = f"http://{self.headers['Host']}"
            recs = [{**r, "file": f"{base}/{r['file']}"} for r in by_species.get(match.group(1), [])]
            self.reply(200, json.dumps({"numRecordings": str(len(recs)), "numSpecies": "1", "page": 1,
                                        "numPages": 1, "recordings": recs}).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/api/3/recordings"


def train_teacher(home: Path, name: str, external: bool, seed: int) -> Path:
    """Round 0 with the default config, as a user runs it; returns the model path."""
    env = {**os.environ, "BIRDROUNDS_HOME": str(home)}
    subprocess.run([sys.executable, str(REPO / "rounds" / "run.py"), f"experiment_name={name}", f"seed={seed}",
                    "logger=none", f"data.external.enabled={str(external).lower()}"], check=True, env=env, cwd=home)
    return home / "runs" / name / "round_0" / MODEL_FILE


@torch.no_grad()
def soundscape_auc_per_class(model_path: Path, chunks: SoundscapeChunks, solution: pd.DataFrame) -> pd.Series:
    """Per-class ROC-AUC of a checkpoint on the labeled validation soundscapes (5-s rows)."""
    model, ckpt = load_checkpoint(model_path)
    probs = []
    for start in range(0, len(chunks), 32):
        batch = torch.stack([chunks[i]["audio"] for i in range(start, min(start + 32, len(chunks)))])
        probs.append(torch.sigmoid(model(batch)["logits"]).numpy())
    pred = pd.DataFrame(np.concatenate(probs), columns=ckpt["classes"]).assign(row_id=chunks.rows["row_id"].values)
    truth = solution.set_index("row_id").loc[pred["row_id"]].reset_index()
    return per_class_roc_auc(truth[ckpt["classes"]], pred[ckpt["classes"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="BIRDROUNDS_HOME for data, downloads and runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BIRDROUNDS_HOME"] = str(home)
    cfg = compose([])
    root = synthesize(cfg.data.synth, cfg.data.root, num_workers=cfg.data.num_workers)

    server, api_url = serve_archive(root / "xc_archive")
    out_dir = home / "external_data" / "xeno_canto"
    settings = XCSettings(data_root=str(root), out_dir=str(out_dir), api_url=api_url, api_key=KEY,
                          min_recordings=cfg.data.synth.minority_max_files + 1, exclude_licenses=[],
                          min_interval_s=0.0, progress=False)
    summaries = download_xeno_canto(settings)
    server.shutdown()
    extended = sorted(s.label for s in summaries if s.downloaded or s.existing)
    print(f"downloaded {sum(s.downloaded for s in summaries)} recordings for {len(extended)} classes")

    without = train_teacher(home, f"xc_without_s{args.seed}", external=False, seed=args.seed)
    with_xc = train_teacher(home, f"xc_with_s{args.seed}", external=True, seed=args.seed)

    audio = AudioCache(cfg.data.cache_dir, cfg.data.sample_rate_hz)
    chunks = SoundscapeChunks(sorted((root / "val_soundscapes").glob("*.ogg")), audio)
    solution = pd.read_csv(root / "val_solution.csv")
    table = pd.DataFrame({"without": soundscape_auc_per_class(without, chunks, solution),
                          "with_xc": soundscape_auc_per_class(with_xc, chunks, solution)})
    table["change"] = table["with_xc"] - table["without"]
    focal = pd.read_csv(root / "train.csv")["primary_label"].value_counts()
    table["focal_clips"] = focal.reindex(table.index).fillna(0).astype(int)
    rows = table.loc[[c for c in extended if c in table.index]]
    print("\nper-class val soundscape AUC, extended classes (NaN = no positive in the validation soundscapes):")
    print(rows.round(3).to_string())
    scored = rows.dropna(subset=["change"])
    print(f"\nextended classes scored: {len(scored)}, mean change {scored['change'].mean():+.3f}")
    print(f"macro AUC over all scored classes: without {table['without'].mean():.3f}, "
          f"with {table['with_xc'].mean():.3f}")


if __name__ == "__main__":
    main()
