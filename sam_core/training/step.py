"""Interactive training of SAM: simulated clicks over several rounds, one optimiser step.

``InteractiveSam`` wraps a model with the official interface (``image_encoder``,
``prompt_encoder``, ``mask_decoder``, ``preprocess``, ``mask_threshold``) in an
``nn.Module`` whose ``forward`` returns the losses. Wrapping matters for DDP: gradients
are only synchronised when the wrapped module's own ``forward`` runs, so the whole
simulation has to live inside one.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batch import Batch
from .losses import MaskLosses, multimask_losses
from .prompts import noisy_boxes, round_schedule, sample_error_points, sample_points_in_masks


@dataclass
class InteractiveConfig:
    """The simulation and loss recipe; defaults follow the SAM paper (appendix A)."""

    num_rounds: int = 11
    num_rounds_without_point: int = 2
    box_probability: float = 0.5
    box_noise_fraction: float = 0.1
    box_max_noise: float = 20.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    supervise_all_iou: bool = True
    # Side of the square the loss is computed at; None means the input frame (as SAM 2
    # does). A smaller side trades thin-structure fidelity for CPU time, but it should stay
    # above the side of the mask logits (a quarter of the input): at that side the targets
    # are binary blocks and the sub-pixel boundary that inference draws by upsampling the
    # logits is never trained (see InteractiveSam).
    loss_size: int | None = None


_SUMMED = ("loss", "focal", "dice", "iou_mse")


class InteractiveSam(nn.Module):
    """Runs the interactive simulation of a batch and returns its losses."""

    def __init__(self, sam: nn.Module, config: InteractiveConfig | None = None) -> None:
        super().__init__()
        self.sam = sam
        self.config = config or InteractiveConfig()
        logits_side = sam.prompt_encoder.mask_input_size[0]
        if self.config.loss_size is not None and self.config.loss_size <= logits_side:
            # Measured on the synthetic test scenes, 512-px model: a perfect answer to
            # binary 128x128 targets reaches 0.82 mIoU, one to 256x256 targets 0.88.
            warnings.warn(
                f"loss_size {self.config.loss_size} is not above the side of the mask logits "
                f"({logits_side}): the loss sees block-aligned targets and cannot train the "
                f"boundary that upsampled logits draw; use at least {2 * logits_side}",
                stacklevel=2,
            )

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        Returns a dict of scalars:
            loss: the total to back-propagate, averaged over masks and rounds.
            focal, dice, iou_mse: its parts (unweighted), averaged the same way.
            iou_first, iou_last: mean IoU with the ground truth of the mask the model
                would return (highest predicted IoU) after the first and last round.
            num_masks: number of masks trained on.
        """
        sam = self.sam
        if batch.embeddings is not None:
            embeddings, high_res = batch.embeddings, batch.high_res or []
        else:
            embeddings, high_res = encode(sam, encoder_input(sam, batch))
        image_pe = sam.prompt_encoder.get_dense_pe()
        totals: dict[str, torch.Tensor] = {}
        count = 0
        for b, (gt, size) in enumerate(zip(batch.masks, batch.input_sizes)):
            if len(gt) == 0:
                continue
            train_iou = batch.supervise_iou is None or batch.supervise_iou[b]
            maps = [level[b : b + 1] for level in high_res] or None  # SAM 2's high-resolution maps
            sums = self._interact(embeddings[b : b + 1], image_pe, gt, size, generator, train_iou, maps)
            for k, v in sums.items():
                totals[k] = totals[k] + v if k in totals else v
            count += len(gt)
        if count == 0:
            raise ValueError("batch has no masks to train on")
        rounds = self.config.num_rounds
        out = {k: totals[k] / (count * rounds) for k in _SUMMED}
        out["iou_first"] = totals["iou_first"] / count
        out["iou_last"] = totals["iou_last"] / count
        out["num_masks"] = torch.tensor(float(count))
        return out

    def _prompt_embeddings(
        self,
        first_points: torch.Tensor,
        boxes: torch.Tensor,
        point_idx: torch.Tensor,
        box_idx: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse and dense embeddings for a mix of point-started and box-started masks.

        The two groups go through the prompt encoder separately (the official encoder
        takes one kind of first prompt per call) and are put back in mask order. Both
        give the same token count: point group = clicks + padding token, box group =
        clicks + 2 corners (SAM 2, which also pads after a box: one more padding token
        in the point group).
        """
        pe = self.sam.prompt_encoder
        sparse, dense, order = [], [], []
        if len(point_idx):
            pts = torch.cat([first_points[:, None], coords[point_idx]], dim=1)
            first = torch.ones(len(point_idx), 1, dtype=labels.dtype, device=labels.device)
            lbl = torch.cat([first, labels[point_idx]], dim=1)
            if getattr(pe, "boxes_as_points", False) and len(box_idx):  # official SAM 1: no such flag
                pts = torch.cat([pts, pts.new_zeros(len(point_idx), 1, 2)], dim=1)
                lbl = torch.cat([lbl, lbl.new_full((len(point_idx), 1), -1)], dim=1)
            s, d = pe(points=(pts, lbl), boxes=None, masks=None if mask_input is None else mask_input[point_idx])
            sparse.append(s), dense.append(d), order.append(point_idx)
        if len(box_idx):
            points = (coords[box_idx], labels[box_idx]) if coords.shape[1] else None
            s, d = pe(points=points, boxes=boxes, masks=None if mask_input is None else mask_input[box_idx])
            sparse.append(s), dense.append(d), order.append(box_idx)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(sparse)[inverse], torch.cat(dense)[inverse]

    def _interact(
        self,
        embedding: torch.Tensor,
        image_pe: torch.Tensor,
        gt: torch.Tensor,
        input_size: tuple[int, int],
        generator: torch.Generator | None,
        train_iou: bool = True,
        high_res: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sums over masks and rounds of the losses of one image's masks (MxSxS gt).

        ``train_iou`` False: the IoU head gets no loss from these masks (its error is
        still reported in ``iou_mse``).
        """
        cfg, sam = self.config, self.sam
        device, m, side = gt.device, len(gt), gt.shape[-1]
        valid = torch.zeros(side, side, dtype=torch.bool, device=device)
        valid[: input_size[0], : input_size[1]] = True
        loss_size = cfg.loss_size or side
        targets = gt if loss_size == side else (
            F.interpolate(gt[None].float(), (loss_size, loss_size), mode="area")[0] >= 0.5
        )

        schedule = round_schedule(cfg.num_rounds, cfg.num_rounds_without_point, generator)
        use_box = torch.rand(m, generator=generator, device=device) < cfg.box_probability
        point_idx = torch.nonzero(~use_box)[:, 0]
        box_idx = torch.nonzero(use_box)[:, 0]
        first_points = sample_points_in_masks(gt[point_idx], generator) if len(point_idx) else None
        boxes = (
            noisy_boxes(gt[box_idx], generator, cfg.box_noise_fraction, cfg.box_max_noise)
            if len(box_idx) else None
        )
        coords = torch.zeros(m, 0, 2, device=device)
        labels = torch.zeros(m, 0, dtype=torch.long, device=device)

        sums: dict[str, torch.Tensor] = {}
        mask_input = pred = None
        rows = torch.arange(m, device=device)
        for r, adds_point in enumerate(schedule):
            if r > 0 and adds_point:
                c, lbl = sample_error_points(pred, gt, valid, generator)
                coords = torch.cat([coords, c[:, None]], dim=1)
                labels = torch.cat([labels, lbl[:, None]], dim=1)
            sparse, dense = self._prompt_embeddings(
                first_points, boxes, point_idx, box_idx, coords, labels, mask_input
            )
            # Only a lone first point is ambiguous: it gets the three multimask outputs.
            # A box, or any prompt with corrective clicks, gets the single-mask token, as
            # at inference (the predictor's box and multi-click answers; SAM 2 trains
            # the same way).
            groups = [(point_idx, True), (box_idx, False)] if coords.shape[1] == 0 else [(rows, False)]
            next_input, chosen_iou = None, 0
            for idx, multimask in groups:
                if len(idx) == 0:
                    continue
                # Only SAM 2 takes high-resolution maps; the official SAM 1 decoder has no such argument.
                extra = {"high_res_features": high_res} if high_res else {}
                low_res, iou_pred = sam.mask_decoder(
                    image_embeddings=embedding,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse[idx],
                    dense_prompt_embeddings=dense[idx],
                    multimask_output=multimask,
                    **extra,
                )
                losses = self._losses(low_res, iou_pred, targets[idx], loss_size, train_iou)
                for name, value in zip(_SUMMED, (losses.loss, losses.focal, losses.dice, losses.iou)):
                    sums[name] = sums.get(name, 0) + value.sum()
                # Feed back what inference would return: the candidate with the highest
                # predicted IoU, as unthresholded low-res logits (detached: the paper
                # back-propagates each round's loss, not through the chain of rounds).
                local = torch.arange(len(idx), device=device)
                chosen = iou_pred.detach().argmax(1)
                if next_input is None:
                    next_input = low_res.new_zeros(m, 1, *low_res.shape[-2:])
                next_input[idx] = low_res.detach()[local, chosen][:, None].to(next_input.dtype)
                chosen_iou = chosen_iou + losses.actual_iou[local, chosen].sum()
            mask_input = next_input
            pred = F.interpolate(mask_input, (side, side), mode="bilinear", align_corners=False)[:, 0]
            pred = pred > sam.mask_threshold
            if r == 0:
                sums["iou_first"] = chosen_iou
        sums["iou_last"] = chosen_iou
        return sums

    def _losses(
        self, low_res: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, loss_size: int,
        train_iou: bool = True,
    ) -> MaskLosses:
        cfg = self.config
        iou_weight = cfg.iou_weight if train_iou else 0.0

        def compute(low: torch.Tensor, iou: torch.Tensor) -> MaskLosses:
            logits = low.float()
            if logits.shape[-1] != loss_size:
                logits = F.interpolate(logits, (loss_size, loss_size), mode="bilinear", align_corners=False)
            return multimask_losses(
                logits, iou, targets, cfg.focal_weight, cfg.dice_weight, iou_weight,
                cfg.supervise_all_iou, self.sam.mask_threshold,
            )

        if not torch.is_grad_enabled():
            return compute(low_res, iou_pred)
        # Upsampled logits of every round would otherwise all stay in memory until
        # backward (11 rounds x M x 3 x S x S); recomputing them there is cheap.
        return MaskLosses(*checkpoint(compute, low_res, iou_pred, use_reentrant=False))


def encode(sam: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings and SAM 2's high-resolution maps (none for SAM 1), for our models
    and for the official ``segment_anything`` one, which has no ``encode``."""
    if hasattr(sam, "encode"):
        return sam.encode(images)
    return sam.image_encoder(images), []


def encoder_input(sam: nn.Module, batch: Batch) -> torch.Tensor:
    """The batch's images normalised (and, SAM 1, padded) as the image encoder takes them."""
    return torch.stack([sam.preprocess(img[:, :h, :w]) for img, (h, w) in zip(batch.images, batch.input_sizes)])


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One optimiser step of an ``InteractiveSam`` (or its DDP wrapper) on ``batch``.

    Returns the floats of ``InteractiveSam.forward``, plus ``grad_norm`` when
    ``grad_clip`` is set. bf16 autocast covers the model only; losses are in float32.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = batch.images.device.type
    ctx = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    with ctx:
        out = model(batch, generator)
    out["loss"].backward()
    result = {k: float(v.detach()) for k, v in out.items()}
    if grad_clip is not None:
        result["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    return result
