"""Time to first token for a question about a video, vlmc against transformers in one run,
and vlmc's second question about the same video (vision features and prefix-cache blocks
reused).

    python benchmarks/video_ttft.py ARTIFACT --checkpoint CKPT [--seconds 10 --fps 2 --size 448]
        [--rounds 3] [--no-transformers]

ARTIFACT is a compiled artifact of a family that takes videos (e.g. Qwen2-VL-2B or
gemma-4-E2B shapes, q4) and CKPT the checkpoint it was compiled from (transformers runs it in
float32; the transformers side is written for Qwen2-VL, so other families run with
``--no-transformers``). The clip is made here with PyAV:
``--seconds`` of ``--size`` x ``--size`` video at 30 fps with moving shapes, h264; both sides
sample it at ``--fps`` (transformers' Qwen2VLVideoProcessor with do_sample_frames) and time
from the file on disk: decoding, sampling, preprocessing, the vision tower, prefill and one
token. vlmc runs through its batching loop (``runtime.batcher``) with a fresh vision cache and
prefix cache per round, so the first question is cold and the second one is what a chat
about the video sees. Rounds alternate vlmc and transformers; medians are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import vlmc  # noqa: E402 - first: it sets OpenBLAS's thread timeout before numpy's BLAS loads

QUESTIONS = ("Which color appears first in this video?", "Where does the blue disc go?")


def make_clip(path: Path, seconds: float, size: int, rate: int = 30) -> Path:
    import av
    n = int(seconds * rate)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), np.full_like(xx, 96)], -1).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        side = size // 5
        for k in range(n):
            f = base.copy()
            x0 = (k * 5) % (size - side)
            f[size // 4:size // 4 + side, x0:x0 + side] = (230, 20, 20)
            cy = (k * 3) % (size - side) + side // 2
            f[(yy - cy) ** 2 + (xx - size * 2 // 3) ** 2 < (side // 2) ** 2] = (20, 20, 230)
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def vlmc_round(model, clip: Path, fps: float) -> dict:
    """Cold first question, then a second one about the same clip, through the batching loop."""
    from vlmc.runtime.batcher import Batcher, FinishEvent, Job
    from vlmc.runtime.prefix_cache import PrefixCache
    from vlmc.runtime.vision_cache import VisionFeatureCache
    batcher = Batcher(model, vision_cache=VisionFeatureCache(), prefix_cache=PrefixCache())
    out = {}
    try:
        for k, question in enumerate(QUESTIONS):
            done, seen = threading.Event(), {}

            def emit(ev, seen=seen, done=done):
                seen.setdefault("first", time.perf_counter())
                if isinstance(ev, FinishEvent):
                    seen["cached"], seen["prompt"] = ev.cached_tokens, ev.prompt_tokens
                    done.set()
            t0 = time.perf_counter()
            prompt = model.build_prompt(messages=[{"role": "user", "content": [
                {"type": "video", "video": str(clip), "fps": fps}, {"type": "text", "text": question}]}])
            batcher.submit(Job(prompt, emit, max_tokens=1))
            done.wait()
            out[f"q{k + 1}"] = seen["first"] - t0
            out[f"q{k + 1}_cached"] = seen["cached"]
            out["prompt_tokens"] = seen["prompt"]
            imgs = prompt.images  # Qwen-VL: each video's (t, h, w) patch grid; else its soft tokens per frame
            out["grid"] = imgs.grid_thw.tolist() if imgs.grid_thw is not None else list(imgs.num_tokens)
    finally:
        batcher.shutdown()
    return out


class Transformers:
    def __init__(self, ckpt: Path):
        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fixtures.torchvision_loader import import_torchvision  # torchvision beside CPU torch
        if import_torchvision() is None:
            raise SystemExit("transformers' video processor needs torchvision: "
                             "pip install --no-deps --target .test-deps torchvision==0.28.0")
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        pp = json.loads((ckpt / "preprocessor_config.json").read_text())
        keep = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                "image_std")
        kwargs = {k: pp[k] for k in keep if k in pp}
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        self.processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**kwargs), tokenizer=tok,
                                          video_processor=Qwen2VLVideoProcessor(**kwargs, cap_pixels_per_frame=False),
                                          chat_template=tok.chat_template)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        self.torch = torch

    def ttft(self, clip: Path, fps: float) -> float:
        from transformers.video_utils import read_video_pyav
        t0 = time.perf_counter()
        frames, meta = read_video_pyav(str(clip), sample_indices_fn=lambda metadata, **kw: np.arange(
            metadata.total_num_frames))
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTIONS[0]}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=True, fps=fps,
                                return_tensors="pt")
        with self.torch.no_grad():
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--checkpoint", help="The checkpoint transformers runs (the artifact's source).")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    model = vlmc.load(args.artifact)
    hf = None if args.no_transformers or not args.checkpoint else Transformers(Path(args.checkpoint))
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", args.seconds, args.size)
        rows: list[dict] = []
        hf_times: list[float] = []
        for r in range(args.rounds):
            row = vlmc_round(model, clip, args.fps)
            rows.append(row)
            print(f"round {r + 1}: vlmc TTFT {row['q1']:.2f} s, second question {row['q2']:.3f} s "
                  f"({row['q2_cached']} of {row['prompt_tokens']} prompt tokens reused; grid {row['grid']})",
                  flush=True)
            if hf is not None:
                hf_times.append(hf.ttft(clip, args.fps))
                print(f"round {r + 1}: transformers TTFT {hf_times[-1]:.2f} s", flush=True)
    q1 = statistics.median(r["q1"] for r in rows)
    q2 = statistics.median(r["q2"] for r in rows)
    print(f"\nclip {args.seconds:g} s, {args.size}x{args.size}, sampled at {args.fps:g} fps; "
          f"{rows[0]['prompt_tokens']} prompt tokens; medians of {args.rounds} rounds")
    print(f"vlmc          first question  {q1:8.2f} s")
    print(f"vlmc          second question {q2:8.3f} s  ({100 * q2 / q1:.1f}% of the first)")
    if hf_times:
        hq = statistics.median(hf_times)
        print(f"transformers  first question  {hq:8.2f} s  (vlmc / transformers = {q1 / hq:.2f})")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
