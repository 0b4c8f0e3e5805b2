"""The retrain and eval stages end to end: real Ray Train, real shards, real loaders."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image
from pycocotools import mask as mask_utils

import sam_core
from pipeline.dataset.shards import ShardWriter, sa1b_record
from pipeline.paths import PROJECT_ROOT
from pipeline.stages import run_stage
from pipeline.training.optim import lr_factor
from pipeline.truth.ground_truth import CocoInstances, ShardMasks
from pipeline.truth.synthetic import make_scene
from sam_core.metrics import amg_matches, next_click, resolution_ceiling

TINY = [
    "model=vit_tiny",
    "stage.batch_size=1",
    "stage.interactive.num_rounds=2",
    "stage.interactive.num_rounds_without_point=1",
    "stage.interactive.loss_size=128",
    "stage.data.max_masks_per_image=3",
    "stage.optim.warmup_steps=1",
    "stage.checkpoint_every=1",
    "stage.log_every=1",
]


def _cfg(output: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"output={output}", *overrides])


def _write_shard(path: Path, seeds: list[int]) -> list[dict]:
    """A shard of synthetic scenes; mask i gets predicted_iou 0.8 when i is odd."""
    records = []
    with ShardWriter(str(path)) as writer:
        for image_id, seed in enumerate(seeds):
            scene = make_scene(seed, size=(240, 320))
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="JPEG", quality=95)
            masks = []
            for i, m in enumerate(scene.masks):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                masks.append({
                    "segmentation": rle, "bbox": mask_utils.toBbox(rle).tolist(), "area": int(m.sum()),
                    "predicted_iou": 0.8 if i % 2 else 0.95, "stability_score": 0.97,
                    "crop_box": [0, 0, 320, 240], "point_coords": [[0.0, 0.0]],
                })
            record = sa1b_record(f"sa_{image_id}", image_id, 320, 240, masks)
            writer.write(f"sa_{image_id}", buf.getvalue(), record)
            records.append((scene, record))
    return records


def test_lr_schedule_warms_up_then_steps_down():
    f = partial(lr_factor, warmup=10, total=100, decay_at=[0.5, 0.9], factor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(49) == 1.0
    assert f(50) == pytest.approx(0.1) and f(89) == pytest.approx(0.1) and f(90) == pytest.approx(0.01)


def test_shards_are_read_back_with_quality_filter(tmp_path):
    records = _write_shard(tmp_path / "sa_000000.tar", [1, 2])
    got = list(ShardMasks([str(tmp_path / "sa_000000.tar")], pred_iou_thresh=0.88, stability_score_thresh=0.95))
    assert [g.key for g in got] == ["sa_0", "sa_1"]
    for g, (scene, _) in zip(got, records):
        assert g.image.shape == (240, 320, 3)
        assert np.array_equal(g.masks, scene.masks[0::2])  # the odd ones fail predicted_iou


def test_coco_instances_are_read_back(tmp_path):
    scene = make_scene(9, size=(120, 160))
    Image.fromarray(scene.image).save(tmp_path / "img_9.png")
    anns = []
    for i, m in enumerate(scene.masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": i + 1, "image_id": 9, "category_id": 1, "segmentation": rle, "iscrowd": int(i == 0),
                     "area": int(m.sum()), "bbox": mask_utils.toBbox(rle).tolist()})
    coco = {"images": [{"id": 9, "file_name": "img_9.png", "height": 120, "width": 160}],
            "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (got,) = list(CocoInstances(str(tmp_path / "instances.json"), str(tmp_path)))
    assert got.key == "img_9" and np.array_equal(got.image, scene.image)
    assert np.array_equal(got.masks, scene.masks[1:])  # the crowd region is not an instance


def test_eval_click_protocol_and_matching():
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    (x, y), label = next_click(gt, None)
    assert label == 1 and 18 <= x <= 21 and 18 <= y <= 21
    spill = gt.copy()
    spill[10:30, 30:40] = True  # FP region 20x10, no FN
    (x, y), label = next_click(gt, spill)
    assert label == 0 and x >= 30
    miss = np.zeros_like(gt)
    miss[10:30, 10:14] = True  # FN region 20x16
    (x, y), label = next_click(gt, miss)
    assert label == 1 and gt[y, x] and not miss[y, x]
    masks = np.stack([gt, miss])
    records = [{"segmentation": mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))}]
    best_gt, best_pred = amg_matches(records, masks)
    assert best_gt.tolist() == pytest.approx([1.0, 0.2]) and best_pred.tolist() == [1.0]


def test_resolution_ceiling_penalises_what_the_mask_grid_cannot_draw():
    masks = np.zeros((3, 512, 512), bool)
    masks[0, 100:400, 50:450] = True        # large: drawn almost exactly
    masks[1, 200:216, 200:216] = True       # 16 px: two logits of a 64-grid
    masks[2, 300:302, 20:500] = True        # a 2-px line: below one logit
    coarse, fine = resolution_ceiling(masks, 64), resolution_ceiling(masks, 512)
    assert coarse[0] > 0.98 and coarse[1] < coarse[0] and coarse[2] < 0.5
    assert fine.tolist() == pytest.approx([1.0, 1.0, 1.0])  # at full resolution nothing is lost
    assert (resolution_ceiling(masks, 128) >= coarse - 1e-6).all()


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_retrain_end_to_end_resume_official_loading_and_eval(tmp_path, ray_local):
    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    _write_shard(shards / "sa_000000.tar", [3, 4])
    out = tmp_path / "out"
    common = [*TINY, f"stage.data.shards={tmp_path / 'data'}", "stage.data.shards_weight=1.0"]
    evals = ["stage.eval.num_images=1", "stage.eval.max_masks_per_image=2", "stage.eval.amg.points_per_side=4"]

    # An interrupted run (2 of 3 steps) continued later must equal an uninterrupted one.
    leftovers = set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))
    first = run_stage(_cfg(out, "+stage=retrain", "stage.version=a", "stage.steps=3", "stage.stop_at_step=2",
                           *common, *evals))
    resumed = run_stage(_cfg(out, "+stage=retrain", "stage.version=a", "stage.steps=3",
                             "stage.eval.enabled=false", *common))
    straight = run_stage(_cfg(out, "+stage=retrain", "stage.version=b", "stage.steps=3",
                              "stage.eval.enabled=false", *common))
    assert first["steps"] == 2 and not first["complete"]
    # Resuming reads the checkpoint in place: no copy of it is left behind in /tmp.
    assert set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*")) <= leftovers
    assert resumed["steps"] == straight["steps"] == 3 and resumed["complete"]
    hist_a = [json.loads(line) for line in (out / "models/a/history.jsonl").read_text().splitlines()]
    hist_b = [json.loads(line) for line in (out / "models/b/history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist_a] == [1, 2, 3]
    for ha, hb in zip(hist_a, hist_b):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-4)
    sa, sb = _state(out / "models/a/model.pth"), _state(out / "models/b/model.pth")
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)

    # The registered file is a plain official state dict: both loaders take it strictly.
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    official = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256, patch_size=16, embed_dim=192, depth=6, num_heads=3, window_size=8,
            global_attn_indexes=(2, 5), out_chans=128, use_rel_pos=True, mlp_ratio=4, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(embed_dim=128, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(
            transformer_dim=128, transformer=TwoWayTransformer(depth=2, embedding_dim=128, mlp_dim=512, num_heads=8),
            iou_head_hidden_dim=128,
        ),
    )
    official.load_state_dict(sa, strict=True)
    ours = sam_core.sam_model_registry["vit_tiny"](checkpoint=str(out / "models/a/model.pth"))
    assert torch.equal(ours.state_dict()["mask_decoder.iou_token.weight"], sa["mask_decoder.iou_token.weight"])
    # Training moved the weights away from the initialisation.
    torch.manual_seed(0)
    assert not torch.equal(sam_core.sam_model_registry["vit_tiny"]().state_dict()["mask_decoder.iou_token.weight"],
                           sa["mask_decoder.iou_token.weight"])

    registered = out / "models/a"
    assert (registered / "figures/training.png").stat().st_size > 1000
    assert json.loads((registered / "data.json").read_text())["shards"] == [str(shards / "sa_000000.tar")]
    assert "retrain" in (registered / "config.yaml").read_text()
    assert not (registered / "eval.json").exists()  # stale after re-registration without eval

    # Eval stage on a registered version, by name, as the architecture it was trained as
    # (vit_tiny; the default model is vit_tiny_512).
    result = run_stage(_cfg(out, "+stage=eval", "stage.checkpoint=b", "stage.num_images=1",
                            "stage.max_masks_per_image=2", "stage.amg.points_per_side=4"))
    saved = json.loads((out / "eval/eval.json").read_text())
    assert result["arch"] == "vit_tiny"
    assert saved == pytest.approx(result) or saved.keys() == result.keys()
    for key in ("point_miou_1", "point_miou_5", "box_miou", "resolution_ceiling_miou", "amg_recall_0.5",
                "amg_precision_0.75"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["masks"] == 2 and saved["model"].endswith("models/b/model.pth")


def test_console_shows_each_progress_line_once_and_no_ray_noise(tmp_path, tiny_checkpoint):
    """The command a user runs, in its own in-process cluster, with relative paths as in
    the README (resolved against the working directory, not the Ray Train worker's):
    every progress line once (Ray Train's print patch doubled them), and none of the
    placement-group cleaner's once-a-second warnings about the state API the local
    cluster leaves off."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "start.pth").write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "data").mkdir()
    _write_shard(tmp_path / "data" / "sa_000000.tar", [5])
    command = [sys.executable, "-m", "pipeline.run", "+stage=retrain", "output=runs/r1", "stage.version=q",
               "stage.steps=6", *TINY, "stage.checkpoint_every=3", "stage.eval.enabled=false",
               "cluster.num_cpus=1", "stage.init_checkpoint=models/start.pth", "stage.data.shards=data"]
    done = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    steps = re.findall(r"\[retrain\] step (\d+)/6 ", done.stdout)
    assert steps == [str(i) for i in range(1, 7)], done.stdout[-3000:]
    assert "Failed to query Ray Train Controller" not in done.stdout
    registered = tmp_path / "runs" / "r1" / "models" / "q"
    config = yaml.safe_load((registered / "config.yaml").read_text())
    assert config["stage"]["init_checkpoint"] == str(tmp_path / "models" / "start.pth")
    assert json.loads((registered / "data.json").read_text())["shards"] == [str(tmp_path / "data" / "sa_000000.tar")]
    kept = sorted(p.name for p in (tmp_path / "runs" / "r1" / "train_runs" / "q").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000003", "checkpoint_00000006"]
    assert all((tmp_path / "runs/r1/train_runs/q" / k / "complete.json").is_file() for k in kept)


def test_checkpoints_are_trusted_only_when_marked_complete(tmp_path):
    """A folder Ray was killed while uploading (no marker, or a later step without one)
    is never resumed from."""
    from pipeline.training import checkpoints

    run = tmp_path / "run"
    for step, marked in ((4, True), (8, True), (12, False)):
        folder = run / checkpoints.folder_name(step)
        folder.mkdir(parents=True)
        (folder / checkpoints.MODEL_FILE).write_bytes(b"truncated" if not marked else b"")
        if marked:
            (folder / checkpoints.COMPLETE_FILE).write_text(json.dumps({"step": step}))
    (run / "checkpoint_tmp_1234").mkdir()  # not a checkpoint folder at all
    assert checkpoints.latest(str(run)) == str(run / "checkpoint_00000008")
    assert checkpoints.latest(str(tmp_path / "nothing")) is None


def test_registered_config_is_read_without_resolvers(tmp_path, monkeypatch):
    """A version's config.yaml is data: an interpolation in it is not resolved (it could
    read the environment), and only a plain architecture name is taken from it."""
    from pipeline.models import registry

    monkeypatch.setenv("SECRET_FOR_TEST", "vit_tiny")
    version = tmp_path / "models" / "v001"
    version.mkdir(parents=True)
    (version / "model.pth").write_bytes(b"")
    (version / "config.yaml").write_text("stage:\n  arch: ${oc.env:SECRET_FOR_TEST}\n")
    assert registry.read_config(str(version))["stage"]["arch"] == "${oc.env:SECRET_FOR_TEST}"
    checkpoint = registry.resolve_model("v001", str(tmp_path))
    assert checkpoint == str(version / "model.pth")
    assert registry.registered_arch(checkpoint) == "${oc.env:SECRET_FOR_TEST}"
    from pipeline.models.loader import load_sam

    with pytest.raises(ValueError, match="unknown model.arch"):
        load_sam({"arch": registry.registered_arch(checkpoint), "checkpoint": checkpoint})
    (version / "config.yaml").write_text("stage:\n  arch: !!python/name:os.system\n")
    with pytest.raises(yaml.YAMLError):
        registry.read_config(str(version))
    with pytest.raises(FileNotFoundError, match="neither a file nor a version"):
        registry.resolve_model("v002", str(tmp_path))


@pytest.mark.parametrize("recipe", ["retrain_default_cpu", "retrain_default_gpu"])
def test_default_model_recipes_compose(recipe, tmp_path):
    """The documented default-model commands compose, name a registered architecture and
    register a version under the output."""
    cfg = _cfg(tmp_path, f"+stage={recipe}")
    assert cfg.stage.arch in sam_core.sam_model_registry
    assert cfg.stage.version and cfg.stage.steps > 0


def test_the_mask_filter_says_what_it_keeps_and_refuses_to_keep_nothing(tmp_path, caplog):
    """By default (null thresholds) every mask the dataset holds trains; a filter that
    keeps few masks warns with the numbers and the settings; one that keeps none (and
    nothing else trains) is refused before any training."""
    from pipeline.dataset.listing import committed_shards
    from pipeline.stages.retrain import check_mask_filter
    from tests.dataset_factory import make_dataset

    dataset = make_dataset(tmp_path / "ds", num_shards=2)
    shards = committed_shards(str(dataset.root))
    total = sum(len(s.masks) for s in dataset.samples)

    def data(iou, stability):
        return {"pred_iou_thresh": iou, "stability_score_thresh": stability, "synthetic": {"enabled": "auto"},
                "coco": {"annotations": None}, "shards": shards}

    assert check_mask_filter(data(None, None), shards) == {"masks": total, "kept": total}
    caplog.clear()
    few = check_mask_filter(data(1.01, None), shards)  # predicted IoU spans 0.88-1.02: a few reach 1.01
    assert 0 < few["kept"] < 0.1 * total
    assert f"keeps only {few['kept']} of {total} masks" in caplog.text
    assert "stage.data.pred_iou_thresh=1.01" in caplog.text
    with pytest.raises(ValueError, match=f"keeps none of the {total} masks"):
        check_mask_filter(data(1.5, None), shards)


def test_eval_reads_input_as_ground_truth_and_training_stages_refuse_it(tmp_path, compose_config):
    """eval input=<COCO folder> measures on it (not on the synthetic test split);
    stages that do not read input= refuse one instead of ignoring it."""
    from pipeline.truth.pools import write_scenes

    folder = tmp_path / "coco"
    write_scenes(folder, 2, (128, 128), domain="microscopy")
    result = run_stage(compose_config("+stage=eval", f"input={folder}", f"output={tmp_path / 'out'}",
                                      "stage.num_images=2", "stage.automatic=false"))
    assert result["source"] == "coco" and result["images"] == 2
    with pytest.raises(ValueError, match="expected a COCO folder"):
        run_stage(compose_config("+stage=eval", f"input={tmp_path}", f"output={tmp_path / 'out'}"))
    for stage in ("retrain", "detector", "engine", "verifier"):
        with pytest.raises(ValueError, match=f"{stage} does not read input="):
            run_stage(compose_config(f"+stage={stage}", f"input={folder}", f"output={tmp_path / stage}"))
