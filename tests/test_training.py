"""Losses, prompt simulation and the interactive train step, with real models."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pipeline.truth.synthetic import make_scene
from sam_core import sam_model_registry
from sam_core.training import (
    InteractiveConfig,
    InteractiveSam,
    binary_mask_iou,
    collate,
    dice_loss,
    multimask_losses,
    noisy_boxes,
    prepare_sample,
    round_schedule,
    sample_error_points,
    sample_points_in_masks,
    select_masks,
    sigmoid_focal_loss,
    train_step,
)


# ----------------------------------------------------------------------------- losses
def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    target = torch.tensor([[1, 0], [0, 1]])
    expected = 0.0
    for x, t in ((0.0, 1), (2.0, 0), (-1.0, 0), (0.0, 1)):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t else 1 - p
        alpha_t = 0.25 if t else 0.75
        expected += alpha_t * -math.log(p_t) * (1 - p_t) ** 2
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(expected / 4, rel=1e-6)


def test_dice_loss_matches_hand_computation():
    logits = torch.zeros(2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[1, 0], [0, 0]])
    # 1 - (2 * 0.5 + 1) / (4 * 0.5 + 1 + 1) = 0.5
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    confident = torch.full((2, 2), -50.0)
    confident[0, 0] = 50.0
    assert dice_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_iou():
    a = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    assert binary_mask_iou(a, b).item() == pytest.approx(1 / 3)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert binary_mask_iou(empty, empty).item() == 1.0


def test_multimask_loss_trains_the_best_candidate_and_the_iou_head():
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, 2:6, 2:6] = True
    good = torch.where(target, 10.0, -10.0)[0]
    half = good.clone()
    half[2:4] = -10.0  # half the object: IoU 0.5
    wrong = -good
    logits = torch.stack([wrong, good, half])[None]
    iou_pred = torch.tensor([[0.2, 0.9, 0.5]])
    out = multimask_losses(logits, iou_pred, target)
    assert out.best.tolist() == [1]
    assert out.actual_iou[0].tolist() == pytest.approx([0.0, 1.0, 0.5])
    # all three IoU predictions are supervised: ((0.2)^2 + 0.1^2 + 0) / 3
    assert out.iou.item() == pytest.approx((0.04 + 0.01) / 3, rel=1e-5)
    expected_mask = 20 * sigmoid_focal_loss(good, target[0]) + dice_loss(good, target[0])
    assert out.loss.item() == pytest.approx(expected_mask.item() + out.iou.item(), rel=1e-5)
    only_best = multimask_losses(logits, iou_pred, target, supervise_all_iou=False)
    assert only_best.iou.item() == pytest.approx(0.01, rel=1e-5)


# ---------------------------------------------------------------------------- prompts
def _square_masks() -> torch.Tensor:
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 10:20, 10:20] = True
    masks[1, 40:42, 5:60] = True
    masks[2, 0:64, 30:31] = True
    return masks


def test_points_fall_inside_masks_uniformly():
    masks = _square_masks()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xy = sample_points_in_masks(masks, g).long()
        assert masks[torch.arange(3), xy[:, 1], xy[:, 0]].all()
    four = torch.zeros(1, 8, 8, dtype=torch.bool)
    four[0, 0, 0] = four[0, 0, 7] = four[0, 7, 0] = four[0, 7, 7] = True
    hits = torch.stack([sample_points_in_masks(four, g)[0] for _ in range(800)])
    _, counts = torch.unique(hits, dim=0, return_counts=True)
    assert len(counts) == 4 and counts.min() > 150  # expected 200 each
    with pytest.raises(ValueError):
        sample_points_in_masks(torch.zeros(1, 4, 4, dtype=torch.bool), g)


def test_error_points_are_positive_on_false_negatives_negative_on_false_positives():
    target = torch.zeros(200, 32, 32, dtype=torch.bool)
    target[:, 8:24, 8:24] = True
    pred = torch.zeros_like(target)
    pred[:, 8:24, 16:30] = True  # misses the left half (FN), spills right (FP)
    g = torch.Generator().manual_seed(1)
    xy, labels = sample_error_points(pred, target, generator=g)
    x, y = xy[:, 0].long(), xy[:, 1].long()
    idx = torch.arange(200)
    fn = target & ~pred
    fp = pred & ~target
    assert (fn[idx, y, x] == (labels == 1)).all()
    assert (fp[idx, y, x] == (labels == 0)).all()
    assert (fn | fp)[idx, y, x].all()
    # 16x8 FN pixels vs 16x6 FP pixels: uniform over the error region
    assert labels.float().mean().item() == pytest.approx(128 / 224, abs=0.1)


def test_error_points_respect_padding_and_exact_predictions():
    target = torch.zeros(2, 16, 16, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    pred = target.clone()
    pred[0, 10:16, 10:16] = True  # FP only in the padded area
    valid = torch.zeros(16, 16, dtype=torch.bool)
    valid[:8, :8] = True
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        xy, labels = sample_error_points(pred, target, valid, g)
        x, y = xy[:, 0].long(), xy[:, 1].long()
        assert valid[y, x].all()
        # nothing wrong inside the image: a negative click on the background
        assert (labels == 0).all() and not target[torch.arange(2), y, x].any()


def test_noisy_boxes_stay_within_bounds():
    masks = torch.zeros(2, 320, 320, dtype=torch.bool)
    masks[0, 100:150, 200:250] = True  # side 49: sigma 4.9 px
    masks[1, 30:290, 30:290] = True  # side 259: sigma 25.9, clipped at 20 px
    g = torch.Generator().manual_seed(3)
    tight = torch.tensor([[200, 100, 249, 149], [30, 30, 289, 289]], dtype=torch.float)
    deltas = torch.stack([noisy_boxes(masks, g) - tight for _ in range(400)])
    assert deltas.abs().max() <= 20 + 1e-4
    small = deltas[:, 0]
    assert small.std().item() == pytest.approx(4.9, rel=0.1)
    assert (deltas[:, 1].abs() > 19.9).float().mean() > 0.3  # P(|N(0, 25.9)| > 20) = 0.44
    edge = torch.zeros(1, 50, 50, dtype=torch.bool)
    edge[0, 0:10, 40:50] = True
    boxes = torch.stack([noisy_boxes(edge, g)[0] for _ in range(200)])
    assert (boxes >= 0).all() and (boxes <= 49).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()


def test_round_schedule():
    g = torch.Generator().manual_seed(4)
    seen_middle = set()
    for _ in range(30):
        s = round_schedule(11, 2, g)
        assert len(s) == 11 and s[0] and not s[-1] and s.count(False) == 2
        seen_middle.add(s.index(False))
    assert len(seen_middle) > 3  # the other point-free round moves around
    assert round_schedule(3, 0, g) == [True] * 3
    assert round_schedule(1, 2, g) == [True]


def test_select_masks_drops_huge_and_caps_count():
    masks = np.zeros((5, 10, 10), bool)
    masks[0] = True  # the whole image: dropped
    for i in range(1, 5):
        masks[i, i, :] = True
    idx = select_masks(masks, max_masks=3, rng=np.random.default_rng(0))
    assert len(idx) == 3 and 0 not in idx


# ------------------------------------------------------------------------- train step
def _scene_batch(seeds, max_masks: int, size: int = 512):
    samples = []
    for seed in seeds:
        scene = make_scene(seed, size=(size, size))
        idx = select_masks(scene.masks, max_masks, min_area=64, rng=np.random.default_rng(seed))
        samples.append(prepare_sample(scene.image, scene.masks[idx], size))
    return collate(samples)


def test_prepare_sample_resizes_longest_side_and_pads():
    scene = make_scene(5, size=(300, 600))
    image, (h, w), masks = prepare_sample(scene.image, scene.masks, 512)
    assert (h, w) == (256, 512) and image.shape == (3, 512, 512)
    assert image[:, 256:].abs().sum() == 0 and not masks[:, 256:].any()
    big = int(np.argmax(scene.areas))
    assert masks[big].sum().item() == pytest.approx(scene.areas[big] * (512 / 600) ** 2, rel=0.05)


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return sam_model_registry["vit_tiny"]()


def test_interactive_forward_is_deterministic_and_checkpointing_changes_nothing(tiny_sam):
    model = InteractiveSam(tiny_sam, InteractiveConfig(num_rounds=3, num_rounds_without_point=1))
    batch = _scene_batch([11], max_masks=4)
    with torch.no_grad():
        a = model(batch, torch.Generator().manual_seed(0))
        b = model(batch, torch.Generator().manual_seed(0))
    c = model(batch, torch.Generator().manual_seed(0))  # grad mode: checkpointed losses
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert c[k].item() == pytest.approx(a[k].item(), rel=1e-4, abs=1e-6), k
    c["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # every part of the model learns, including the mask-prompt path of later rounds
    for prefix in ("sam.image_encoder.", "sam.prompt_encoder.mask_downscaling", "sam.mask_decoder.iou_prediction_head"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("box_probability", [0.0, 0.5, 1.0])
def test_only_a_lone_first_point_gets_the_multimask_output(tiny_sam, box_probability):
    """As at inference: one click -> three candidates; a box, or any prompt with
    corrective clicks -> the single-mask token."""
    calls = []

    def record(module, args, kwargs):
        calls.append((len(kwargs["sparse_prompt_embeddings"]), kwargs["multimask_output"]))

    model = InteractiveSam(tiny_sam, InteractiveConfig(num_rounds=2, num_rounds_without_point=0,
                                                       box_probability=box_probability))
    batch = _scene_batch([11], max_masks=6)
    m = len(batch.masks[0])
    handle = tiny_sam.mask_decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(batch, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    first, later = calls[:-1], calls[-1]
    assert later == (m, False)  # round 1: every mask has a corrective click
    multi = sum(n for n, flag in first if flag)
    single = sum(n for n, flag in first if not flag)
    assert multi + single == m
    if box_probability == 0.0:
        assert first == [(m, True)]
    elif box_probability == 1.0:
        assert first == [(m, False)]
    else:
        assert multi > 0 and single > 0
    assert 0.0 <= out["iou_first"].item() <= 1.0


def _official_small_sam():
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256, patch_size=16, embed_dim=96, depth=2, num_heads=3, window_size=4,
            global_attn_indexes=(1,), out_chans=64, use_rel_pos=True, mlp_ratio=4, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(embed_dim=64, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(
            transformer_dim=64, transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=256, num_heads=8),
            iou_head_hidden_dim=64,
        ),
    )
    return sam


def test_runs_with_the_official_segment_anything_model():
    model = InteractiveSam(_official_small_sam(), InteractiveConfig(num_rounds=3, box_probability=0.5))
    batch = _scene_batch([1, 2], max_masks=6, size=256)
    out = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), batch, torch.Generator().manual_seed(0))
    assert out["num_masks"] == batch.num_masks and math.isfinite(out["loss"])


def test_bf16_autocast_step_keeps_float32_losses_and_weights():
    model = InteractiveSam(_official_small_sam(), InteractiveConfig(num_rounds=2))
    batch = _scene_batch([3], max_masks=4, size=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch,
                     torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16, grad_clip=1.0)
    assert math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_few_steps_on_one_scene_reduce_the_loss(tiny_sam):
    torch.manual_seed(0)
    sam = sam_model_registry["vit_tiny"]()
    model = InteractiveSam(sam, InteractiveConfig(num_rounds=2, num_rounds_without_point=0, loss_size=128))
    batch = _scene_batch([21], max_masks=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(batch, torch.Generator().manual_seed(123))["loss"].item()

    before = held_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        train_step(model, optimizer, batch, g, grad_clip=1.0)
    after = held_loss()
    assert after < 0.75 * before, (before, after)  # measured: 3.45 -> 1.87


def test_generated_masks_can_leave_the_iou_head_untrained(tiny_sam):
    """supervise_iou=False: the IoU head gets no gradient from that image, the rest of
    the model the same gradient as before (mask losses unchanged)."""
    model = InteractiveSam(tiny_sam, InteractiveConfig(num_rounds=2, num_rounds_without_point=1))
    base = _scene_batch([11], max_masks=3, size=256)
    grads = {}
    for flag in (True, False):
        batch = collate([(base.images[0], base.input_sizes[0], base.masks[0])], [flag])
        model.zero_grad(set_to_none=True)
        out = model(batch, torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads[flag] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        assert out["iou_mse"] > 0  # still reported
    model.zero_grad(set_to_none=True)
    head = [n for n in grads[True] if n.startswith("sam.mask_decoder.iou_prediction_head")]
    assert head and all(grads[True][n].abs().sum() > 0 for n in head)
    assert all(grads[False][n] is None or grads[False][n].abs().sum() == 0 for n in head)
    hyper = [n for n in grads[True] if n.startswith("sam.mask_decoder.output_hypernetworks_mlps")]
    assert any(grads[False][n] is not None and grads[False][n].abs().sum() > 0 for n in hyper)
    with pytest.raises(ValueError, match="supervise_iou"):
        collate([(base.images[0], base.input_sizes[0], base.masks[0])], [True, False])


@pytest.mark.parametrize("loss_size, warns", [(64, True), (128, False), (None, False)])
def test_a_loss_at_the_logits_own_resolution_warns(tiny_sam, loss_size, warns):
    """vit_tiny answers with 64x64 logits: a 64x64 loss cannot train sub-pixel boundaries."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        InteractiveSam(tiny_sam, InteractiveConfig(loss_size=loss_size))
    assert any("loss_size" in str(w.message) for w in caught) == warns


def test_training_progress_lines_carry_the_time_left():
    """The first step's line is the run's estimate; a short run still gets lines (at most
    a tenth of the run apart), and the last step always has one."""
    from pipeline.training.trainer import StepProgress

    progress = StepProgress("retrain", 0, 30, every=50)
    due = [done for done in range(1, 31) if progress.due(done)]
    assert due == [1, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    line = progress.line(1, "loss 0.5")
    assert line.startswith("[retrain] step 1/30 loss 0.5 | ") and line.endswith(" left") and "s/step" in line
    resumed = StepProgress("detector", 100, 200, every=10)
    assert resumed.due(101) and resumed.due(110) and not resumed.due(105) and resumed.due(200)
