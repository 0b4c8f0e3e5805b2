"""Click-to-mask latency of the annotation tool, measured inside the browser.

    python benchmarks/annotate_latency.py                               # default model, 512x512
    python benchmarks/annotate_latency.py --model vit_b --size 1500 2000  # ViT-B, random weights
    python benchmarks/annotate_latency.py --threads 4                   # onnxruntime-web threads

Starts the annotate stage's tool in this process (the configured model; vit_b/l/h on
random weights, since no official checkpoint can be downloaded here), opens it in
headless Chromium (Debian's, driven by Playwright), and clicks real mouse clicks at
random points of the image, dropping the prompt every 5 clicks so that prompts have 1
to 5 points (the first of each with the 3 candidate masks). For each click the page
records (window.sam.stats) the time from the pointer event to the full-size mask
(decoder + upsampling) and to the frame that shows it. Printed: median and 95th
percentile over the clicks, and the decoder call alone (onnxruntime-web session.run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.annotate.app import build  # noqa: E402
from pipeline.truth.synthetic import make_scene  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipeline.config  # noqa: F401  registers ${project_root:}

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def measure(url: str, clicks: int, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        page.goto(url)
        page.wait_for_function("window.sam && window.sam.state.ready", timeout=600_000)
        rect = page.locator("#view").bounding_box()
        zoom = page.evaluate("window.sam.state.zoom")
        view = page.evaluate("window.sam.state.view")
        rng = random.Random(0)
        warmup = 5
        for i in range(clicks + warmup):
            if i % 5 == 0:
                page.keyboard.press("Escape")
            x, y = rng.uniform(0.05, 0.95) * view["width"], rng.uniform(0.05, 0.95) * view["height"]
            page.mouse.click(rect["x"] + zoom["tx"] + x * zoom["s"], rect["y"] + zoom["ty"] + y * zoom["s"])
            page.wait_for_function(f"window.sam.stats.clicks.length >= {i + 1}", timeout=120_000)
        records = page.evaluate("window.sam.stats.clicks")[warmup:]
        decoder_ms = page.evaluate("""async () => {
          const d = window.sam.state.decoder, c = window.sam.state.current, t = [];
          for (let i = 0; i < 50; i++) {
            const a = performance.now();
            await d.run([[10, 10]], [1], null, null, window.sam.state.H, window.sam.state.W);
            t.push(performance.now() - a);
          }
          return t;
        }""")
        info = page.evaluate("({threads: navigator.hardwareConcurrency, isolated: self.crossOriginIsolated, "
                             "ua: navigator.userAgent})")
        browser.close()
    mask = [r["mask_ms"] for r in records]
    phases = {f"{name}_median": statistics.median(r[name] for r in records)
              for name in ("before_ms", "run_ms", "upsample_ms")}
    painted = [r["painted_ms"] for r in records]
    return {
        "clicks": len(records), "image": f"{view['width']}x{view['height']}",
        "mask_ms_median": statistics.median(mask), "mask_ms_p95": percentile(mask, 95), "mask_ms_min": min(mask),
        "painted_ms_median": statistics.median(painted), "painted_ms_p95": percentile(painted, 95),
        "decoder_run_ms_median": statistics.median(decoder_ms), "decoder_run_ms_p95": percentile(decoder_ms, 95),
        "decoder_run_ms_min": min(decoder_ms),
        "phases": phases, "browser": info,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default",
                        help="model config: default (vit_tiny_512), vit_tiny, vit_b, vit_l, vit_h")
    parser.add_argument("--random-weights", action="store_true", help="implied for vit_b/l/h")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--clicks", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime-web threads (0: its default)")
    parser.add_argument("--chromium",
                        default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="annotate-bench-"))
    (work / "images").mkdir()
    Image.fromarray(make_scene(1_000_000_123, tuple(args.size)).image).save(work / "images" / "scene.png")
    overrides = ["+stage=annotate", f"input={work / 'images'}", f"output={work / 'out'}", "stage.port=0",
                 f"stage.browser_threads={args.threads}", "stage.lookahead=0"]
    if args.model != "default":
        overrides.append(f"model={args.model}")
    if args.random_weights or args.model in ("vit_b", "vit_l", "vit_h"):
        overrides.append("model.checkpoint=null")
    tool = build(compose(overrides))
    try:
        url = tool.start()
        start = time.perf_counter()
        tool.session.embedding("sa_1")  # the encoder is not what this measures
        encoder_s = time.perf_counter() - start
        result = measure(url, args.clicks, args.chromium)
    finally:
        tool.stop()
        shutil.rmtree(work, ignore_errors=True)
    result.update(model=tool.session.model.arch,
                  weights="random" if "model.checkpoint=null" in overrides else "checkpoint",
                  embedding=list(tool.session.model.embedding_shape), threads_setting=args.threads,
                  encoder_s=round(encoder_s, 2), cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                  load_average=os.getloadavg())
    print(json.dumps(result, indent=2))
    print(f"{result['model']} ({result['weights']}), {result['image']}: click to mask median "
          f"{result['mask_ms_median']:.1f} ms, p95 {result['mask_ms_p95']:.1f} ms over {result['clicks']} clicks; "
          f"to the painted frame median {result['painted_ms_median']:.1f} ms; decoder run alone median "
          f"{result['decoder_run_ms_median']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
