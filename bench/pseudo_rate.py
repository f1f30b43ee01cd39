"""Pseudo-labeling throughput: a trained checkpoint over the train soundscapes, as a student round does it.

Builds the round's windows (`SoundscapeChunks` over the train soundscapes with `pseudo.window_s` /
`pseudo.stride_s`) and times `birdrounds.pseudo.predict_windows` -- the function `rounds.pseudo_label`
calls -- at `train.batch_size` on the GPU when there is one (else the CPU). One untimed warm-up batch,
then `--repeats` timed passes over every window; the best pass is reported as windows/s and as seconds
of soundscape labelled per second (per file, the last window's nominal end).

    python bench/pseudo_rate.py runs/demo/round_0/model.pt [--json out.json] [--record] [Hydra overrides]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from birdrounds.config import compose  # noqa: E402
from birdrounds.data.prepare import prepare_data  # noqa: E402
from birdrounds.data.soundscapes import SoundscapeChunks  # noqa: E402
from birdrounds.contract import SCORED_CHUNK_S  # noqa: E402
from birdrounds.model import load_checkpoint  # noqa: E402
from birdrounds.pseudo import is_framewise, predict_windows  # noqa: E402
from records import add_record_option, record_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", type=Path, default=None)
    add_record_option(parser)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = compose(["logger=none", *args.overrides])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or cfg.train.batch_size
    prepared = prepare_data(cfg.data, seed=cfg.seed, progress=False)
    chunks = SoundscapeChunks(prepared.data.soundscapes, prepared.audio, window_s=cfg.pseudo.window_s,
                              stride_s=cfg.pseudo.stride_s)
    framewise = is_framewise(chunks, SCORED_CHUNK_S)
    model = load_checkpoint(args.checkpoint)[0]
    predict_windows([model], chunks, framewise, list(range(min(batch_size, len(chunks)))),
                    batch_size=batch_size, device=device)  # warm-up: cuDNN autotune, allocator
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = predict_windows([model], chunks, framewise, batch_size=batch_size, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = min(times)
    audio_s = float(chunks.rows.groupby("file")["end_s"].max().sum())  # nominal length labelled
    result = {
        "device": str(device), "checkpoint": str(args.checkpoint), "windows": len(chunks),
        "window_s": cfg.pseudo.window_s, "stride_s": cfg.pseudo.stride_s, "framewise": bool(framewise),
        "batch_size": batch_size, "output_shape": list(out.shape), "seconds": [round(t, 3) for t in times],
        "windows_per_s": round(len(chunks) / best, 2),
        "soundscape_s": round(audio_s, 1), "soundscape_s_per_s": round(audio_s / best, 1),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record:
        record_result("pseudo_rate", result, overrides=args.overrides)


if __name__ == "__main__":
    main()
