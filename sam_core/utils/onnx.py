"""The prompt encoder and mask decoder as one graph over a precomputed image embedding,
for export to ONNX (browsers, onnxruntime) with the official export's interface.

Inputs (all float32, as in the official export):
  image_embeddings  1 x C x h x w   from the image encoder (C=256, h=w=64 for ViT-B/L/H;
                                    128 x 32 x 32 for the project's vit_tiny_512)
  point_coords      1 x N x 2       (x, y) in the model's input frame (long side = img_size)
  point_labels      1 x N           1 positive, 0 negative, 2 / 3 box top-left / bottom-right,
                                    -1 padding (add one padding point when there is no box)
  mask_input        1 x 1 x 4h x 4w low-res logits of a previous answer
  has_mask_input    1               1 to use mask_input, 0 to ignore it
  orig_im_size      2               (H, W) of the original image
Outputs:
  masks             1 x K x H x W   logits at the original size (threshold at 0)
  iou_predictions   1 x K
  low_res_masks     1 x K x 4h x 4w logits, reusable as mask_input
K = 4 (index 0: the single-mask output, 1..3: the three ambiguity-aware masks), or 1
with ``return_single_mask``. N is dynamic.

SAM 2 / 2.1 (``Sam2OnnxModel``) takes two more inputs after image_embeddings, the
image's high-resolution maps from ``SamPredictor.get_high_res_features``:
  high_res_feats_0  1 x 32 x 4h x 4w
  high_res_feats_1  1 x 64 x 2h x 2w
and differs in three ways: coordinates are in its square frame (x * S / W, y * S / H);
one padding point (-1) always ends the points, box or not (SAM 2's predictor does the
same); masks are upsampled straight to the image size. Output 0 is SAM 2's single-mask
answer (the best multimask output where the single one is unstable), as its predictor
gives for ``multimask_output=False``.

With ``upscale=False`` the graph has neither ``orig_im_size`` nor ``masks``: the caller
upsamples the one low-res mask it wants (``upscale_low_res``, or the annotation tool's
page), instead of the graph resizing all K masks to the image size on every call.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Sam

INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
HIGH_RES_INPUT_NAMES = ("high_res_feats_0", "high_res_feats_1")
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
LOW_RES_INPUT_NAMES, LOW_RES_OUTPUT_NAMES = INPUT_NAMES[:-1], OUTPUT_NAMES[1:]


def input_names(model: nn.Module, upscale: bool = True) -> tuple[str, ...]:
    """The graph's input names for ``model``'s family, in order."""
    names = INPUT_NAMES if upscale else LOW_RES_INPUT_NAMES
    if getattr(model, "family", "sam") == "sam2":
        names = names[:1] + HIGH_RES_INPUT_NAMES + names[1:]
    return names
# Point labels beyond the encoder's own: box corners carry their learned offsets 2 and 3.
LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = 2, 3


class SamOnnxModel(nn.Module):
    """Wraps a ``Sam``'s prompt encoder and mask decoder with the export interface above.

    return_single_mask: output one mask: for a single prompt (one click, or one box) the
        ambiguity-aware mask with the highest predicted IoU, otherwise the single-mask
        output; the same rule as SamPredictor's multimask_output advice.
    """

    def __init__(self, model: Sam, return_single_mask: bool = False, upscale: bool = True) -> None:
        super().__init__()
        self.model = model
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask
        self.upscale = upscale

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        coords = (coords + 0.5) / self.img_size  # pixel centres, then [0, 1]
        embedding = encoder.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1)
        # Masked sums instead of indexing: the graph stays free of data-dependent shapes.
        embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for i, offset in enumerate(encoder.point_embeddings):
            embedding = embedding + offset.weight * (labels == i)
        return embedding

    def _embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        given = encoder.mask_downscaling(mask_input)
        return has_mask_input * given + (1 - has_mask_input) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """As ``Sam.postprocess_masks``, with the sizes computed inside the graph."""
        masks = F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        scale = self.img_size / torch.max(orig_im_size)
        resized = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)  # ResizeLongestSide's rounding
        masks = masks[..., : resized[0], : resized[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def _select_single(self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor) -> tuple:
        # One prompt (a click and its padding point, or the two corners of one box) has
        # N <= 2: the single-mask output is pushed down, else up. N stays a traced value.
        return self._pick(masks, scores, point_labels.shape[1] - 2.5)

    @staticmethod
    def _pick(masks: torch.Tensor, scores: torch.Tensor, excess) -> tuple:
        """excess < 0: one prompt (the best ambiguity-aware mask), > 0: several (output 0)."""
        bias = torch.tensor([[1000.0] + [0.0] * (scores.shape[1] - 1)], device=scores.device)
        best = torch.argmax(scores + excess * bias, dim=1)
        return masks[:, best], scores[:, best]

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor | None = None,
    ):
        return self._decode(image_embeddings, None, point_coords, point_labels, mask_input, has_mask_input,
                            orig_im_size)

    def _decode(self, image_embeddings, high_res, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        decoder = self.model.mask_decoder
        low_res, scores = decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            high_res_features=high_res,
        )
        if decoder.dynamic_multimask_via_stability:
            single, single_score = decoder.select(low_res, scores, multimask_output=False)
            low_res = torch.cat([single, low_res[:, 1:]], dim=1)
            scores = torch.cat([single_score, scores[:, 1:]], dim=1)
        if self.return_single_mask:
            low_res, scores = self._select_single(low_res, scores, point_labels)
        returned = self._returned_low_res(low_res)
        if not self.upscale:
            return scores, returned
        return self._upscale(low_res, orig_im_size), scores, returned

    def _returned_low_res(self, low_res: torch.Tensor) -> torch.Tensor:
        return low_res


class Sam2OnnxModel(SamOnnxModel):
    """``SamOnnxModel`` for SAM 2 / 2.1: the high-resolution maps as inputs, the square
    frame (see the module doc)."""

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor | None = None,
    ):
        return self._decode(image_embeddings, [high_res_feats_0, high_res_feats_1], point_coords, point_labels,
                            mask_input, has_mask_input, orig_im_size)

    def _returned_low_res(self, low_res: torch.Tensor) -> torch.Tensor:
        return low_res.clamp(-32.0, 32.0)  # as SAM 2's predictor returns them (and takes them back)

    def _upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        size = orig_im_size.to(torch.int64)
        return F.interpolate(low_res, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def _select_single(self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor) -> tuple:
        # SAM 2 always adds a padding point, so N cannot tell one box (two corners and the
        # padding) from two clicks: count the prompts, a box by its top-left corner.
        prompts = ((point_labels >= 0) & (point_labels <= 2)).sum()
        return self._pick(masks, scores, prompts - 1.5)


def dummy_inputs(model: Sam, num_points: int = 3) -> dict[str, torch.Tensor]:
    """Inputs of the right shapes for tracing (and for smoke tests), in input order."""
    encoder = model.prompt_encoder
    size = model.image_encoder.img_size
    h, w = encoder.image_embedding_size
    high_res = {}
    if getattr(model, "family", "sam") == "sam2":
        decoder = model.mask_decoder
        high_res = {"high_res_feats_0": torch.randn(1, decoder.conv_s0.out_channels, 4 * h, 4 * w),
                    "high_res_feats_1": torch.randn(1, decoder.conv_s1.out_channels, 2 * h, 2 * w)}
    return {
        "image_embeddings": torch.randn(1, encoder.embed_dim, h, w),
        **high_res,
        "point_coords": torch.randint(0, size, (1, num_points, 2)).float(),
        "point_labels": torch.randint(0, 4, (1, num_points)).float(),
        "mask_input": torch.randn(1, 1, 4 * h, 4 * w),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([size * 0.75, size], dtype=torch.float32),
    }


def upscale_low_res(low_res: torch.Tensor, img_size: int, orig_size: tuple[int, int], family: str = "sam"
                    ) -> torch.Tensor:
    """K x S x S low-res logits -> K x H x W logits, as ``Sam.postprocess_masks`` (or,
    for ``family`` "sam2", ``Sam2.postprocess_masks``)."""
    h, w = orig_size
    if family == "sam2":
        return F.interpolate(low_res[None], (h, w), mode="bilinear", align_corners=False)[0]
    scale = img_size / max(h, w)
    resized = (int(h * scale + 0.5), int(w * scale + 0.5))
    masks = F.interpolate(low_res[None], (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : resized[0], : resized[1]]
    return F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)[0]


def export(model: Sam, path: str, return_single_mask: bool = False, opset: int = 17, upscale: bool = True) -> None:
    """Writes the ONNX graph of ``SamOnnxModel(model)`` (``Sam2OnnxModel`` for SAM 2) to
    ``path`` (weights inside, one file), with a dynamic number of points;
    ``upscale=False``: the low-res graph."""
    wrapper_class = Sam2OnnxModel if getattr(model, "family", "sam") == "sam2" else SamOnnxModel
    wrapper = wrapper_class(model.eval(), return_single_mask=return_single_mask, upscale=upscale).eval()
    inputs = dummy_inputs(model)
    if not upscale:
        del inputs["orig_im_size"]
    # The TorchScript exporter: orig_im_size is data that sets output shapes, which the
    # dynamo exporter cannot trace without guards on every image size.
    with warnings.catch_warnings():
        # The tracer flags the modules' Python-level shape checks, which it freezes; with
        # one image embedding and batch 1 they are constants, not data-dependent branches.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is deprecated in favour of torch.export, which cannot
        # trace the image-size-dependent output (see below); it still ships and works.
        warnings.simplefilter("ignore", DeprecationWarning)
        # SAM 2's stable-single choice indexes with (row, chosen output): never negative.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        _export(wrapper, inputs, path, opset, OUTPUT_NAMES if upscale else LOW_RES_OUTPUT_NAMES)


def _export(wrapper: nn.Module, inputs: dict[str, torch.Tensor], path: str, opset: int, outputs) -> None:
    torch.onnx.export(
        wrapper,
        tuple(inputs.values()),
        path,
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
