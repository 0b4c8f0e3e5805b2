"""Exports a SAM's prompt encoder and mask decoder to ONNX (see ``sam_core.utils.onnx``).

    python -m sam_core.tools.export_onnx --arch vit_tiny_512 --checkpoint models/sam_vit_tiny_512_synthetic.pth \\
        --output decoder.onnx
    python -m sam_core.tools.export_onnx --arch vit_h --checkpoint sam_vit_h_4b8939.pth --output sam_vit_h_decoder.onnx
    python -m sam_core.tools.export_onnx --arch sam2.1_hiera_l --checkpoint sam2.1_hiera_large.pt \
        --output sam2.1_hiera_l_decoder.onnx

The graph takes one image embedding (compute it with ``SamPredictor.set_image`` and
``get_image_embedding``) and any number of points; its inputs and outputs are those of
the official export, so code written for that file runs on this one. SAM 2 / 2.1 has no
official export; its graph also takes the image's two high-resolution maps
(``SamPredictor.get_high_res_features``; see ``sam_core.utils.onnx``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ..build import sam_model_registry
from ..sizes import SAM2_ARCHS
from ..utils.onnx import LOW_RES_OUTPUT_NAMES, OUTPUT_NAMES, dummy_inputs, export, input_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam_core.tools.export_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=sorted(sam_model_registry), help="model architecture")
    parser.add_argument("--checkpoint", help="state dict to export (official format); omit only with --random-weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="export a randomly initialised model (benchmarks)")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--return-single-mask", action="store_true",
                        help="output only the best mask (the official option of the same name)")
    parser.add_argument("--low-res-only", action="store_true",
                        help="no orig_im_size input and no masks output: the caller upsamples low_res_masks "
                             "(what the annotation tool's page does)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="SAM 2 only: the input size the model runs at (default 1024, the released one)")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (not args.random_weights):
        parser.error("give --checkpoint PATH, or --random-weights for a randomly initialised model")

    extra = {} if args.image_size is None else {"image_size": args.image_size}
    if extra and args.arch not in SAM2_ARCHS:
        parser.error("--image-size is for SAM 2 models; a SAM 1 architecture fixes its size")
    sam = sam_model_registry[args.arch](checkpoint=args.checkpoint, **extra)
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    upscale = not args.low_res_only
    export(sam, args.output, return_single_mask=args.return_single_mask, opset=args.opset, upscale=upscale)
    seconds = time.perf_counter() - start
    _smoke_test(sam, args.output, upscale)
    size = os.path.getsize(args.output)
    inputs, outputs = input_names(sam, upscale), OUTPUT_NAMES if upscale else LOW_RES_OUTPUT_NAMES
    print(f"wrote {args.output} ({size / 1e6:.1f} MB, {seconds:.1f} s): inputs {', '.join(inputs)}; "
          f"outputs {', '.join(outputs)}; image embedding {tuple(dummy_inputs(sam)['image_embeddings'].shape)}")
    return 0


def _smoke_test(sam, path: str, upscale: bool) -> None:
    """Runs the written file once with onnxruntime, with 1 and 4 points."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 4):
        feeds = {k: v.numpy() for k, v in dummy_inputs(sam, n).items()}
        if not upscale:
            del feeds["orig_im_size"]
        scores = session.run(["iou_predictions"], feeds)[0]
        if not np.isfinite(scores).all():
            raise RuntimeError(f"{path}: the exported graph returned non-finite IoU predictions for {n} point(s)")


if __name__ == "__main__":
    sys.exit(main())
