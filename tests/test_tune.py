"""Adapting a model to a domain: the target domains, what each tune mode trains, adapter
files on their base, the promotion gate, and a short decoder-only fine-tune that pays."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models.loader import load_sam, model_identity, read_tuned
from pipeline.stages import run_stage
from pipeline.truth.domains import DOMAINS, make_domain_scene
from sam_core import sam_model_registry
from sam_core.training import TUNE_MODES, TunedSpec, apply_tuned, prepare, tuned_state
from tests.conftest import REPO

BASE = REPO / "models" / "sam_vit_tiny_synthetic.pth"  # trained on the shapes domain, 256 px


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_generators_are_deterministic(domain):
    a, b, other = (make_domain_scene(domain, seed, (96, 128)) for seed in (7, 7, 8))
    assert a.image.shape == (96, 128, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, other.image)
    assert len(a.masks) > 0 and a.masks.any(axis=(1, 2)).all()
    if domain != "shapes":  # one layer of instances: touching, never overlapping
        assert a.masks.sum(axis=0).max() == 1


def test_microscopy_has_many_small_cells_and_camouflage_hides_its_objects():
    cells = [make_domain_scene("microscopy", s, (256, 256)) for s in range(4)]
    assert np.mean([len(c.masks) for c in cells]) >= 15
    assert np.median([m.sum() / m.size for c in cells for m in c.masks]) < 0.01
    for scene in (make_domain_scene("camouflage", s, (256, 256)) for s in range(4)):
        grey = scene.image.astype(float).mean(axis=2)
        for mask in scene.masks:  # inside and around differ by little: the same texture, shifted
            ring = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            ring[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9] = True
            ring &= ~scene.masks.any(axis=0)
            if ring.sum() > 50:
                assert abs(grey[mask].mean() - grey[ring].mean()) < 45


@pytest.mark.parametrize("mode", TUNE_MODES)
def test_each_mode_trains_only_its_parts(mode):
    sam = sam_model_registry["vit_tiny"]()
    trainable = set(prepare(sam, TunedSpec(mode)))
    parts = {name.split(".")[0] for name in trainable}
    expected = {"decoder": {"mask_decoder"}, "decoder_prompt": {"mask_decoder", "prompt_encoder"},
                "adapter": {"mask_decoder", "image_encoder"}, "lora": {"mask_decoder", "image_encoder"},
                "full": {"mask_decoder", "prompt_encoder", "image_encoder"}}[mode]
    assert parts == expected
    encoder = {n for n in trainable if n.startswith("image_encoder.")}
    if mode == "adapter":
        assert encoder and all(".adapter." in n for n in encoder)
    if mode == "lora":
        assert encoder and all(".lora_" in n for n in encoder)
    assert set(tuned_state(sam, TunedSpec(mode))) == trainable


def test_lora_merges_into_a_plain_sam_with_the_same_answers():
    torch.manual_seed(0)
    spec = TunedSpec("lora", lora_rank=2)
    tuned = sam_model_registry["vit_tiny"]()
    base = {k: v.clone() for k, v in tuned.state_dict().items()}
    prepare(tuned, spec)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.05)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        want = tuned.image_encoder(x)
    merged = sam_model_registry["vit_tiny"]()
    merged.load_state_dict(base)
    apply_tuned(merged, spec, tuned_state(tuned, spec))
    assert set(merged.state_dict()) == set(base)  # the official keys again
    with torch.no_grad():
        assert torch.allclose(merged.image_encoder(x), want, atol=1e-4)


def _retrain(compose_config, out, *overrides):
    return run_stage(compose_config(
        "+stage=retrain", f"output={out}", "model=vit_tiny", "stage.data.synthetic.enabled=true",
        "stage.data.synthetic.domain=microscopy", "stage.data.synthetic.size=[128,128]",
        "stage.data.synthetic.seed_count=6", "stage.batch_size=1", "stage.checkpoint_every=100", "stage.log_every=5",
        "stage.interactive.num_rounds=2", "stage.interactive.num_rounds_without_point=1",
        "stage.interactive.focal_weight=1.0", "stage.data.max_masks_per_image=6",
        "stage.eval.enabled=false", "stage.eval.domain=microscopy", "stage.eval.size=[128,128]",
        "stage.gate.num_images=4", "stage.eval.max_masks_per_image=12", *overrides))


def test_adapter_files_load_on_their_base_only_and_training_goes_on(ray_local, compose_config, tmp_path):
    out = tmp_path / "out"
    first = _retrain(compose_config, out, "stage.tune=lora", f"stage.init_checkpoint={BASE}", "stage.steps=2",
                     "stage.gate.enabled=false")
    adapter = out / "models" / "v001" / "adapter.pth"
    assert first["model"] == str(adapter) and not (adapter.parent / "model.pth").exists()
    assert adapter.stat().st_size < BASE.stat().st_size / 2  # the tuned tensors only
    meta, tensors = read_tuned(str(adapter))
    assert meta["base"] == str(BASE) and meta["base_sha256"] == model_identity(str(BASE))
    assert meta["tune"]["mode"] == "lora" and all(".lora_" in k or k.startswith("mask_decoder.") for k in tensors)

    # Round trip: the file on its base gives the model the tensors make.
    base = sam_model_registry["vit_tiny"](checkpoint=str(BASE))
    want = apply_tuned(base, TunedSpec(**meta["tune"]), tensors).state_dict()
    loaded = load_sam({"arch": "vit_tiny", "checkpoint": str(adapter), "device": "cpu"}).state_dict()
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)

    # Another base, or the base changed since: refused, naming both models.
    other = tmp_path / "other.pth"
    torch.save(sam_model_registry["vit_tiny"]().state_dict(), other)
    with pytest.raises(ValueError, match="is another model"):
        load_sam({"arch": "vit_tiny", "checkpoint": str(adapter), "device": "cpu", "base": str(other)})
    with pytest.raises(ValueError, match="was tuned from a vit_tiny model"):
        load_sam({"arch": "vit_tiny_512", "checkpoint": str(adapter), "device": "cpu"})

    # Tuning the adapter model the same way goes on with its adapters, on the same base.
    second = _retrain(compose_config, out, "stage.tune=lora", "stage.init_checkpoint=v001", "stage.steps=2",
                      "stage.gate.enabled=false")
    meta2, tensors2 = read_tuned(second["model"])
    assert meta2["base"] == str(BASE) and set(tensors2) == set(tensors)
    assert any(not torch.equal(tensors[k], tensors2[k]) for k in tensors)


def test_the_gate_promotes_a_fine_tune_that_pays_and_refuses_a_harmed_one(ray_local, compose_config, tmp_path):
    """A short decoder-only fine-tune on the microscopy domain raises held-out 1-click mIoU
    there (the gate measures both models on the same held-out scenes); the same run with
    a learning rate that wrecks the decoder is registered but not promoted."""
    out = tmp_path / "out"
    common = ["stage.tune=decoder", f"stage.init_checkpoint={BASE}", "stage.steps=30"]
    good = _retrain(compose_config, out, *common)
    figures = good["gate"]["sets"]["synthetic"]
    assert good["promoted"] and figures["after"] > figures["before"] + 0.05, figures
    harmed = _retrain(compose_config, out, *common, "stage.optim.lr=3.0", "stage.optim.warmup_steps=1")
    figures = harmed["gate"]["sets"]["synthetic"]
    assert not harmed["promoted"] and figures["after"] < figures["before"] - 0.01, figures
    summary = json.loads((out / "models" / harmed["version"] / "train_summary.json").read_text())
    # Registered, with the figures.
    assert summary["promoted"] is False and summary["gate"]["sets"]["synthetic"] == figures


# --- SAM 2 / 2.1 ----------------------------------------------------------------------

SAM2_SIZE = 128  # the Hiera-T network at a small input, for CPU time


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    """Random SAM 2.1 Hiera-T weights in the official file format (the official package
    made them), at SAM2_SIZE."""
    from tests.sam_reference import official_sam2, save_official_sam2

    return save_official_sam2(official_sam2("sam2.1_hiera_t", SAM2_SIZE), tmp_path_factory.mktemp("s2") / "t.pt")


@pytest.mark.parametrize("mode", TUNE_MODES)
def test_sam2_trains_in_every_mode_and_saves_what_the_official_package_loads(mode, sam2_file):
    """Each mode trains its parts of SAM 2 (the projections of the high-resolution maps
    only with the encoder, in ``full``), the loss falls over a few steps on a microscopy
    batch, and the result saves in the released format with its video tensors."""
    from sam_core.checkpoint import official_state
    from sam_core.training import InteractiveConfig, InteractiveSam, collate, prepare_sample, select_masks, train_step
    from tests.sam_reference import official_sam2

    sam = sam_model_registry["sam2.1_hiera_t"](checkpoint=sam2_file, image_size=SAM2_SIZE)
    trainable = set(prepare(sam, TunedSpec(mode)))
    assert any(n.startswith("mask_decoder.conv_s") for n in trainable) == (mode == "full")
    assert any(n.startswith("image_encoder.") for n in trainable) == (mode in ("adapter", "lora", "full"))
    samples = []
    for seed in range(2):
        scene = make_domain_scene("microscopy", seed, (128, 160))
        image, size, masks = prepare_sample(scene.image, scene.masks, SAM2_SIZE, square=True)
        assert size == (SAM2_SIZE, SAM2_SIZE)  # SAM 2's frame: stretched, not padded
        samples.append((image, size, masks[torch.from_numpy(select_masks(masks.numpy(), 4))]))
    batch = collate(samples)
    model = InteractiveSam(sam, InteractiveConfig(num_rounds=2, num_rounds_without_point=1))
    optimizer = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
    losses = [train_step(model, optimizer, batch, torch.Generator().manual_seed(0))["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    if mode in ("decoder", "decoder_prompt", "full"):  # a plain SAM 2 state: the official format
        saved = official_state(sam)["model"]
        assert len([k for k in saved if k.startswith("memory_")]) > 0  # the video tensors came along
        official_sam2("sam2.1_hiera_t", SAM2_SIZE, seed=1).load_state_dict(saved, strict=True)


def test_sam2_retrain_registers_a_checkpoint_the_official_package_loads(ray_local, compose_config, tmp_path):
    """The retrain stage on SAM 2.1 Hiera-T (random weights at the released 1024 px, a
    decoder step on cached features): the registered model.pth is the released format,
    video tensors included, and loads back here and in the official package."""
    from tests.sam_reference import official_sam2, save_official_sam2

    base = save_official_sam2(official_sam2("sam2.1_hiera_t", 1024), tmp_path / "sam2.1_hiera_tiny.pt")
    out = tmp_path / "out"
    summary = run_stage(compose_config(
        "+stage=retrain", f"output={out}", "model=sam2.1_hiera_t", f"stage.init_checkpoint={base}",
        "stage.tune=decoder", "stage.steps=1", "stage.batch_size=1", "stage.data.synthetic.enabled=true",
        "stage.data.synthetic.domain=microscopy", "stage.data.synthetic.size=[128,128]",
        "stage.data.synthetic.seed_count=2", "stage.data.max_masks_per_image=4", "stage.interactive.num_rounds=2",
        "stage.interactive.num_rounds_without_point=1", "stage.interactive.loss_size=256",
        "stage.eval.enabled=false", "stage.gate.enabled=false"))
    saved = torch.load(summary["model"], weights_only=True)
    assert set(saved) == {"model"} and "no_obj_embed_spatial" in saved["model"]
    official_sam2("sam2.1_hiera_t", 1024, seed=2).load_state_dict(saved["model"], strict=True)
    tuned = load_sam({"arch": "sam2.1_hiera_t", "checkpoint": summary["model"], "device": "cpu"})
    original = sam_model_registry["sam2.1_hiera_t"](checkpoint=base)
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, original.state_dict()[k])}
    assert changed and all(k.startswith("mask_decoder.") and ".conv_s" not in k for k in changed)
