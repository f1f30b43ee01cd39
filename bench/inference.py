"""Soundscape inference speed, end to end (decode, frontend, model, smoothing), 5-s chunks per second.

Paths, all on the same files and the same model (default: the BirdCLEF `sed_effnet_b0`, EfficientNet-B0,
128 mels, hop 512, 5-s chunks at 32 kHz, random init, 206 classes):
  torch eager                  soundfile decode -> torch MelFrontend + backbone, batch by batch
  torch spec + ONNX backbone   torch MelFrontend -> spectrogram graph in ONNX Runtime (the seed framework's way)
  full ONNX graph              `infer.py` with the waveform graph (torchaudio mel exported inside)
  fast path (default)          `infer.py` with the spectrogram graph: numpy/scipy frontend, threaded decode
  + INT8 (--int8)              the fast path with the statically quantized backbone
  + OpenVINO (--openvino)      the fast path with predict.engine=openvino / openvino_bf16 (pip install openvino)

    python bench/inference.py [--files 24] [--threads 2] [--int8] [--openvino] [--auc-run RUN_DIR]

--auc-run: a trained run folder (e.g. the demo's runs/demo) whose last round is exported, INT8-quantized
and scored on its data's validation soundscapes, to report the AUC change of the INT8 / OpenVINO
variants (a random-init EfficientNet has no meaningful AUC).
"""

from __future__ import annotations

import argparse
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

from birdrounds import infer
from birdrounds.config import compose
from birdrounds.data.audio import write_audio
from birdrounds.export import export_onnx, quantize_int8
from birdrounds.model import load_checkpoint, save_checkpoint

SMOOTHING = (0.1, 0.8, 0.1)


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


def decode_chunks(path: Path, sr: int, chunk: int) -> np.ndarray:
    """The file's 5-s chunks [n, chunk], the last one zero-padded."""
    wave = infer.read_audio(path, sr)
    n = max(1, -(-len(wave) // chunk))
    return np.pad(wave, (0, n * chunk - len(wave)))[: n * chunk].reshape(n, chunk)


def run_torch(files: list[Path], model: torch.nn.Module, sr: int, batch: int, ort_spec=None) -> np.ndarray:
    """Sequential decode + torch frontend + (torch backbone | ORT spectrogram graph) + smoothing."""
    outputs, index = [], []
    with torch.inference_mode():
        for i, path in enumerate(files):
            chunks = decode_chunks(path, sr, 5 * sr)
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
    return infer.smooth(np.concatenate(outputs), index, SMOOTHING)


def timed(name: str, fn, n_chunks: int, results: list, reference: np.ndarray | None = None) -> np.ndarray:
    start = time.perf_counter()
    probs = fn()
    seconds = time.perf_counter() - start
    diff = float(np.abs(probs - reference).max()) if reference is not None else 0.0
    results.append({"path": name, "chunks": n_chunks, "seconds": round(seconds, 2),
                    "chunks_per_s": n_chunks / seconds, "max_abs_diff_vs_torch": diff})
    print(f"{name}: {n_chunks / seconds:.1f} chunks/s ({seconds:.1f} s), max |diff| vs torch eager {diff:.1e}", flush=True)
    return probs


def fast_settings(threads: int, engine: str = "onnxruntime") -> infer.InferenceSettings:
    """The `birdrounds predict` defaults (configs/predict/default.yaml), on `engine`."""
    return infer.InferenceSettings(intra_op_threads=threads, decode_workers=2, batch_size=8, smoothing=SMOOTHING,
                                   engine=engine)


def auc_change(run_dir: Path, threads: int, openvino: bool) -> list[dict]:
    """Export the run's last round, quantize it, and score float / INT8 (/ OpenVINO) on its val soundscapes."""
    from birdrounds.data.layout import read_table
    from birdrounds.report import completed_rounds
    from birdrounds.submit import soundscape_windows
    from birdrounds.train import soundscape_auc

    _, folder = completed_rounds(run_dir)[-1]
    ckpt_path = folder / "model.pt"
    _, ckpt = load_checkpoint(ckpt_path)
    data_root = Path(ckpt["config"]["data"]["root"])
    val_dir, solution = data_root / "val_soundscapes", read_table(data_root / "val_solution.csv", ("row_id",), "solution")
    sr = ckpt["audio"]["sample_rate_hz"]
    calibration = soundscape_windows([data_root / "train_soundscapes"], sr, 5.0, 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx([str(ckpt_path)], fp32, "spectrogram", verify_audio=calibration[:8])
        from birdrounds.model import MelFrontend

        spec = MelFrontend(**{k: ckpt["model_kwargs"][k] for k in ("sample_rate_hz", "n_fft", "hop_length", "n_mels",
                                                                    "f_min_hz", "f_max_hz", "top_db", "norm")})
        with torch.no_grad():
            calib_spec = spec(torch.from_numpy(calibration)).numpy()
        int8 = quantize_int8(fp32, Path(tmp) / "model_int8.onnx", calib_spec)
        variants = [("fast path, float32", fp32, "onnxruntime"), ("fast path, INT8", int8, "onnxruntime")]
        if openvino:
            variants.append(("fast path, OpenVINO bf16", fp32, "openvino_bf16"))
        for name, path, engine in variants:
            preds = infer.predict_folder([path], val_dir, fast_settings(threads, engine))
            rows.append({"variant": name, "auc_raw": soundscape_auc(preds.raw_probs, np.asarray(preds.row_ids), solution, preds.classes),
                         "chunks_per_s": len(preds.row_ids) / preds.seconds})
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
    parser.add_argument("--model", default="sed_effnet_b0", help="configs/model/<name>")
    parser.add_argument("--n-classes", type=int, default=206)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--openvino", action="store_true")
    parser.add_argument("--skip-waveform", action="store_true", help="skip the (slow) full ONNX graph path")
    parser.add_argument("--auc-run", type=Path, help="trained run folder for the INT8 / OpenVINO AUC change")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose([f"model={args.model}"])
    sr = cfg.data.sample_rate_hz
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "audio").mkdir()
        files = make_soundscapes(tmp / "audio", args.files, args.duration_s, sr)
        torch.manual_seed(0)
        model = instantiate(cfg.model)(num_classes=args.n_classes).eval()
        classes = [f"c{i:03d}" for i in range(args.n_classes)]
        save_checkpoint(tmp / "model.pt", model, classes, extra={"window_s": 5.0})
        verify = decode_chunks(files[0], sr, 5 * sr)[:4]
        spec_path, wave_path = tmp / "model.onnx", tmp / "model_waveform.onnx"
        export_onnx([str(tmp / "model.pt")], spec_path, "spectrogram", verify_audio=verify)
        if not args.skip_waveform:
            export_onnx([str(tmp / "model.pt")], wave_path, "waveform", verify_audio=verify)
        n_chunks = sum(len(decode_chunks(f, sr, 5 * sr)) for f in files)
        print(f"{len(files)} files, {n_chunks} 5-s chunks, {args.threads} threads, model {args.model} "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)", flush=True)

        settings = fast_settings(args.threads)
        warm = files[:1]
        spec_models = infer.load_models([spec_path], args.threads)
        infer.predict_files(spec_models, warm, settings)  # warm-up: first ORT run allocates
        reference = timed("torch eager", lambda: run_torch(files, model, sr, 32), n_chunks, results)
        ort_spec = spec_models[0].session
        timed("torch spec + ONNX backbone", lambda: run_torch(files, model, sr, 32, ort_spec), n_chunks, results, reference)
        if not args.skip_waveform:
            wave_models = infer.load_models([wave_path], args.threads)
            infer.predict_files(wave_models, warm, settings)
            timed("full ONNX graph (infer.py)", lambda: infer.predict_files(wave_models, files, settings).probs,
                  n_chunks, results, reference)
        timed("fast path (infer.py, default)", lambda: infer.predict_files(spec_models, files, settings).probs,
              n_chunks, results, reference)
        if args.int8:
            calib = infer.MelFrontendNumpy(spec_models[0].info.frontend)(
                np.concatenate([decode_chunks(f, sr, 5 * sr) for f in files[:4]])[:48])
            int8_models = infer.load_models([quantize_int8(spec_path, tmp / "model_int8.onnx", calib)], args.threads)
            infer.predict_files(int8_models, warm, settings)
            timed("fast path, INT8 backbone", lambda: infer.predict_files(int8_models, files, settings).probs,
                  n_chunks, results, reference)
        if args.openvino:
            for engine in ("openvino", "openvino_bf16"):
                ov_models = infer.load_models([spec_path], args.threads, engine=engine)
                ov_settings = fast_settings(args.threads, engine)
                infer.predict_files(ov_models, warm, ov_settings)
                timed(f"fast path, {engine} engine", lambda: infer.predict_files(ov_models, files, ov_settings).probs,
                      n_chunks, results, reference)

    eager = results[0]["chunks_per_s"]
    print("\n| path | 5-s chunks/s | x torch eager | max abs diff vs torch eager |")
    print("| --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['path']} | {row['chunks_per_s']:.1f} | {row['chunks_per_s'] / eager:.1f}x | "
              f"{row['max_abs_diff_vs_torch']:.1e} |")
    fast = next(r for r in results if r["path"].startswith("fast path (infer.py"))
    ok = fast["chunks_per_s"] >= 120 and fast["chunks_per_s"] >= 4 * eager
    print(f"\ndefault fast path: {fast['chunks_per_s']:.1f} chunks/s, {fast['chunks_per_s'] / eager:.1f}x torch eager "
          f"(goal >= 120 and >= 4x): {'MET' if ok else 'NOT MET'}")
    report = {"results": results}
    if args.auc_run:
        report["auc"] = auc_change(args.auc_run, args.threads, args.openvino)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
