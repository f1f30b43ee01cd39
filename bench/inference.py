"""Soundscape inference speed, end to end (decode, frontend, model, smoothing), 5-s chunks per second.

Paths, all on the same files and the same model (default: the BirdCLEF `sed_effnet_b0`, EfficientNet-B0,
128 mels, hop 512, 5-s chunks at 32 kHz, random init, 206 classes):
  torch eager                  soundfile decode -> torch MelFrontend + backbone, batch by batch, at batch
                               sizes 4, 8, 16 and 32: the fastest is the baseline
  torch spec + ONNX backbone   torch MelFrontend -> spectrogram graph in ONNX Runtime (the seed framework's way),
                               at the baseline's batch size, on an ONNX Runtime session with --threads threads
  full ONNX graph              `infer.py` with the waveform graph (torchaudio mel exported inside)
  fast path (default)          `infer.py` with the spectrogram graph: numpy/scipy frontend, threaded decode
  + INT8 (--int8)              the fast path with the statically quantized backbone
  + OpenVINO (--openvino)      the fast path with predict.engine=openvino / openvino_bf16 (pip install openvino)

    python bench/inference.py [--files 24] [--threads 2] [--repeats 3] [--int8] [--openvino] [--auc-run RUN_DIR] [--record]

Goal: the default fast path reaches >= 90% of the per-chunk CPU ceiling, i.e. the sum of its stages' costs
(decode, frontend, model, each timed on one thread) spread over --threads cores; exit status 0 when met.

Every path runs --repeats times, the paths taking turns (so a slow spell of the shared host hits them
all); each row reports the median rate, and the range. --threads is the cores given to every path:
torch threads, the seed framework's ONNX Runtime threads, and the fast path's model workers (one
onnxruntime thread each: `birdrounds predict`'s defaults).

--auc-run: a trained run folder (e.g. the demo's runs/demo) whose last round is exported, INT8-quantized
and scored on its data's validation soundscapes, to report the AUC change of the INT8 / OpenVINO
variants (a random-init EfficientNet has no meaningful AUC).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from hydra.utils import instantiate

from birdrounds import audio_io, contract, infer, melspec, postprocess
from birdrounds.artifacts import MODEL_FILE
from birdrounds.config import compose
from birdrounds.data.audio import write_audio
from birdrounds.export import export_onnx, frontend_kwargs, quantize_int8
from birdrounds.model import load_checkpoint, save_checkpoint
from birdrounds.submit import inference_settings
from records import write_record

# The goal in force: the default fast path reaches this share of the per-chunk CPU ceiling (see main).
CEILING_SHARE_GOAL = 0.9


def make_soundscapes(folder: Path, n_files: int, duration_s: float, sr: int, seed: int = 0) -> list[Path]:
    """`n_files` OGG files of coloured noise with chirps (decode cost like real soundscapes)."""
    rng = np.random.default_rng(seed)
    paths = []
    t = np.arange(int(duration_s * sr)) / sr
    for i in range(n_files):
        noise = np.cumsum(rng.normal(0, 0.02, len(t))).astype(np.float32)
        noise -= np.convolve(noise, np.ones(256) / 256, mode="same")
        chirp = 0.1 * np.sin(2 * np.pi * (2000 + 1500 * np.sin(2 * np.pi * 0.3 * t)) * t) * (np.sin(2 * np.pi * 0.1 * t) > 0.6)
        path = folder / f"soundscape_{i:03d}.ogg"
        write_audio(path, (noise + chirp).astype(np.float32) * 0.5, sr)
        paths.append(path)
    return paths


def decode_chunks(path: Path, sr: int) -> np.ndarray:
    """The file's scored 5-s chunks [n, chunk samples], the last one zero-padded."""
    chunk = round(contract.SCORED_CHUNK_S * sr)
    wave = audio_io.read_audio(path, sr)
    n = max(1, -(-len(wave) // chunk))
    return np.pad(wave, (0, n * chunk - len(wave)))[: n * chunk].reshape(n, chunk)


def run_torch(files: list[Path], model: torch.nn.Module, sr: int, batch: int, kernel: tuple[float, ...],
              ort_spec=None) -> np.ndarray:
    """Sequential decode + torch frontend + (torch backbone | ORT spectrogram graph) + smoothing with `kernel`."""
    outputs, index = [], []
    with torch.inference_mode():
        for i, path in enumerate(files):
            chunks = decode_chunks(path, sr)
            probs = []
            for start in range(0, len(chunks), batch):
                wave = torch.from_numpy(chunks[start : start + batch])
                if ort_spec is None:
                    probs.append(torch.sigmoid(model(wave)["logits"]).numpy())
                else:
                    spec = model.frontend(wave).numpy()
                    probs.append(ort_spec.run(["probs"], {"spec": spec})[0])
            outputs.append(np.concatenate(probs))
            index.append(np.full(len(chunks), i))
    index = np.concatenate(index)
    return postprocess.smooth(np.concatenate(outputs), index, kernel)


def run_paths(paths: list[tuple[str, object]], n_chunks: int, repeats: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Time each (name, fn) `repeats` times, the paths taking turns; rows with the median rate."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in paths}
    outputs: dict[str, np.ndarray] = {}
    for r in range(repeats):
        for name, fn in paths:
            start = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - start)
            print(f"  [{r + 1}/{repeats}] {name}: {n_chunks / seconds[name][-1]:.1f} chunks/s", flush=True)
    rows = []
    for name, _ in paths:
        rates = sorted(n_chunks / t for t in seconds[name])
        rows.append({"path": name, "chunks": n_chunks, "seconds": [round(t, 3) for t in seconds[name]],
                     "chunks_per_s": float(np.median(rates)), "min_chunks_per_s": rates[0], "max_chunks_per_s": rates[-1]})
    return rows, outputs


def stage_costs(files: list[Path], spec_path: Path, sr: int, batch: int) -> dict[str, float]:
    """Milliseconds per 5-s chunk of each stage of the fast path, one thread each, run one after the other.

    Their sum over the cores is the ceiling of the pipeline, which runs the stages side by side.
    """
    from threadpoolctl import threadpool_limits

    model = infer.load_models([spec_path], 1, model_workers=1)[0]
    frontend = melspec.MelFrontendNumpy(model.info.frontend)
    with threadpool_limits(limits=1):
        start = time.perf_counter()
        for f in files:  # each file dropped before the next, as the pipeline does
            audio_io.read_audio(f, sr)
        decode = time.perf_counter() - start
        chunks = np.concatenate([decode_chunks(f, sr) for f in files])
        model.run(frontend(chunks[:batch]))  # warm-up
        start = time.perf_counter()
        specs = [frontend(chunks[i : i + batch]) for i in range(0, len(chunks), batch)]
        front = time.perf_counter() - start
        start = time.perf_counter()
        for spec in specs:
            model.run(spec)
        run = time.perf_counter() - start
    n = len(chunks)
    costs = {"decode": decode / n * 1e3, "frontend": front / n * 1e3, "onnxruntime": run / n * 1e3}
    print("one thread, ms per 5-s chunk: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
          + f"; sum {sum(costs.values()):.2f} ms", flush=True)
    return costs


def fast_settings(cfg, threads: int, engine: str = "onnxruntime") -> infer.InferenceSettings:
    """`birdrounds predict`'s settings (configs/predict/default.yaml) with `threads` model workers, on `engine`."""
    return dataclasses.replace(inference_settings(cfg), model_workers=threads, engine=engine)


def auc_change(cfg, run_dir: Path, threads: int, openvino: bool) -> list[dict]:
    """Export the run's last round, quantize it, and score float / INT8 (/ OpenVINO) on its val soundscapes."""
    from birdrounds.data.layout import data_path, read_table
    from birdrounds.metrics import ROW_ID_COLUMN, soundscape_auc
    from birdrounds.report import completed_rounds
    from birdrounds.submit import soundscape_windows

    _, folder = completed_rounds(run_dir)[-1]
    ckpt_path = folder / MODEL_FILE
    _, ckpt = load_checkpoint(ckpt_path)
    data_cfg = ckpt["config"]["data"]
    where = lambda key: data_path(data_cfg["root"], key, data_cfg.get(key))  # noqa: E731
    val_dir, solution = where("val_soundscapes_dir"), read_table(where("val_solution"), (ROW_ID_COLUMN,), "solution")
    sr = ckpt["audio"]["sample_rate_hz"]
    calibration = soundscape_windows([where("soundscapes_dir")], sr, contract.SCORED_CHUNK_S, 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx([str(ckpt_path)], fp32, "spectrogram", verify_audio=calibration[:8])
        from birdrounds.model import MelFrontend

        spec = MelFrontend(**frontend_kwargs(ckpt["model_kwargs"]))
        with torch.no_grad():
            calib_spec = spec(torch.from_numpy(calibration)).numpy()
        int8 = quantize_int8(fp32, Path(tmp) / "model_int8.onnx", calib_spec)
        variants = [("fast path, float32", fp32, "onnxruntime"), ("fast path, INT8", int8, "onnxruntime")]
        if openvino:
            variants.append(("fast path, OpenVINO bf16", fp32, "openvino_bf16"))
        for name, path, engine in variants:
            preds = infer.predict_folder([path], val_dir, fast_settings(cfg, threads, engine))
            auc = soundscape_auc(preds.raw_probs, np.asarray(preds.row_ids), solution, preds.classes)
            rows.append({"variant": name, "auc_raw": auc, "chunks_per_s": len(preds.row_ids) / preds.seconds})
    base = rows[0]["auc_raw"]
    for row in rows:
        row["auc_change"] = row["auc_raw"] - base
        print(f"{row['variant']}: val soundscape AUC {row['auc_raw']:.4f} ({row['auc_change']:+.4f})", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24, help="60-s soundscapes to generate")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per path (the median is reported)")
    parser.add_argument("--model", default="sed_effnet_b0", help="configs/model/<name>")
    parser.add_argument("--n-classes", type=int, default=206)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--openvino", action="store_true")
    parser.add_argument("--skip-waveform", action="store_true", help="skip the (slow) full ONNX graph path")
    parser.add_argument("--auc-run", type=Path, help="trained run folder for the INT8 / OpenVINO AUC change")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--record", action="store_true",
                        help="also write the result as a JSON record into results/ ($BIRDROUNDS_RESULTS_DIR if set; "
                             "bench/records.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose([f"model={args.model}"])
    sr = cfg.data.sample_rate_hz
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "audio").mkdir()
        files = make_soundscapes(tmp / "audio", args.files, args.duration_s, sr)
        torch.manual_seed(0)
        model = instantiate(cfg.model)(num_classes=args.n_classes).eval()
        classes = [f"c{i:03d}" for i in range(args.n_classes)]
        save_checkpoint(tmp / "model.pt", model, classes, extra={"window_s": contract.SCORED_CHUNK_S})
        verify = decode_chunks(files[0], sr)[:4]
        spec_path, wave_path = tmp / "model.onnx", tmp / "model_waveform.onnx"
        export_onnx([str(tmp / "model.pt")], spec_path, "spectrogram", verify_audio=verify)
        if not args.skip_waveform:
            export_onnx([str(tmp / "model.pt")], wave_path, "waveform", verify_audio=verify)
        n_chunks = sum(len(decode_chunks(f, sr)) for f in files)
        print(f"{len(files)} files, {n_chunks} 5-s chunks, {args.threads} threads, model {args.model} "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)", flush=True)

        warm = files[:1]
        kernel = fast_settings(cfg, args.threads).smoothing  # every path smooths as `birdrounds predict` does
        torch_batches = (4, 8, 16, 32)
        eager_rows, eager_out = run_paths(
            [(f"torch eager, batch {b}", lambda b=b: run_torch(files, model, sr, b, kernel)) for b in torch_batches],
            n_chunks, args.repeats)
        baseline = max(eager_rows, key=lambda row: row["chunks_per_s"])
        baseline_batch = torch_batches[eager_rows.index(baseline)]
        reference = eager_out[baseline["path"]]
        print(f"baseline: {baseline['path']} ({baseline['chunks_per_s']:.1f} chunks/s)", flush=True)

        # The seed framework's ORT session: one call at a time on all the threads.
        seed_session = infer.load_models([spec_path], args.threads, model_workers=1)[0].session
        paths = [("torch spec + ONNX backbone", lambda: run_torch(files, model, sr, baseline_batch, kernel, seed_session))]
        variants = [("full ONNX graph (infer.py)", wave_path, "onnxruntime")] if not args.skip_waveform else []
        variants.append(("fast path (infer.py, default)", spec_path, "onnxruntime"))
        if args.int8:
            calib = melspec.MelFrontendNumpy(infer.OnnxModel(spec_path).info.frontend)(
                np.concatenate([decode_chunks(f, sr) for f in files[:4]])[:48])
            variants.append(("fast path, INT8 backbone", quantize_int8(spec_path, tmp / "model_int8.onnx", calib),
                             "onnxruntime"))
        if args.openvino:
            variants += [(f"fast path, {engine} engine", spec_path, engine) for engine in ("openvino", "openvino_bf16")]
        for name, path, engine in variants:
            variant = fast_settings(cfg, args.threads, engine)
            models = infer.load_models([path], variant.intra_op_threads, engine=engine,
                                       model_workers=variant.n_model_workers)
            infer.predict_files(models, warm, variant)  # warm-up: the first calls allocate
            paths.append((name, lambda m=models, v=variant: infer.predict_files(m, files, v).probs))
        rows, outputs = run_paths(paths, n_chunks, args.repeats)
        stages = stage_costs(files, spec_path, sr, fast_settings(cfg, args.threads).batch_size)
        results = eager_rows + rows
        for row in results:
            row["max_abs_diff_vs_torch"] = float(np.abs({**eager_out, **outputs}[row["path"]] - reference).max())

    eager = baseline["chunks_per_s"]
    print(f"\nmedian of {args.repeats} runs per path (range in brackets), {args.threads} threads; "
          f"x torch eager = against the fastest torch eager batch size ({baseline_batch})")
    print("| path | 5-s chunks/s | x torch eager | max abs diff vs torch eager |")
    print("| --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['path']} | {row['chunks_per_s']:.1f} ({row['min_chunks_per_s']:.0f}-{row['max_chunks_per_s']:.0f}) "
              f"| {row['chunks_per_s'] / eager:.2f}x | {row['max_abs_diff_vs_torch']:.1e} |")
    fast = next(r for r in results if r["path"].startswith("fast path (infer.py"))
    # The goal: the pipeline keeps the cores busy. The ceiling is the per-chunk work of its stages (decode,
    # frontend, model; each timed on one thread) spread over every core with no waiting.
    ceiling = args.threads * 1e3 / sum(stages.values())
    ok = fast["chunks_per_s"] >= CEILING_SHARE_GOAL * ceiling
    print(f"\ndefault fast path: {fast['chunks_per_s']:.1f} chunks/s, {fast['chunks_per_s'] / eager:.2f}x torch eager, "
          f"{fast['chunks_per_s'] / ceiling:.0%} of the per-chunk CPU ceiling "
          f"(goal >= {CEILING_SHARE_GOAL:.0%} of the ceiling): {'MET' if ok else 'NOT MET'}")
    print("stages of the fast path, one thread, ms per chunk: "
          + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f"; {args.threads} cores busy all the time would give {ceiling:.0f} chunks/s")
    report = {"results": results, "stages_ms_per_chunk": stages}
    if args.auc_run:
        report["auc"] = auc_change(cfg, args.auc_run, args.threads, args.openvino)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.record:
        rows = [{**row, "x_torch_eager": row["chunks_per_s"] / eager} for row in results]
        record = {"files": len(files), "chunks": n_chunks, "threads": args.threads, "model": args.model,
                  "baseline": baseline["path"], "rows": rows, "stages_ms_per_chunk": stages,
                  "ceiling_chunks_per_s": ceiling, "fast_path_share_of_ceiling": fast["chunks_per_s"] / ceiling,
                  "goal": f">= {CEILING_SHARE_GOAL:.0%} of the per-chunk CPU ceiling", "goal_met": ok,
                  "auc": report.get("auc")}
        title = f"Inference speed, {args.model}, {len(files)} soundscapes of {args.duration_s:g} s, {args.threads} threads"
        print(f"record: {write_record('inference', 'inference', record, title=title)}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
