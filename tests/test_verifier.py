"""The mask verifier: its features, its fit on real generator masks of synthetic scenes
(it must beat a constant classifier on held-out scenes), its threshold, its files, the
decisions table, the verifier stage, and its use as a filter in a real fully_auto run."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.dataset.provenance import ConfigMismatch
from pipeline.dataset.shards import iter_shard
from pipeline.models import verifier
from pipeline.models.loader import build_generator
from pipeline.stages import run_stage
from pipeline.truth.synthetic import iter_scenes, make_scene, scene_seeds
from tests.conftest import REPO

# The shipped 256-px model with its shipped thresholds (model=vit_tiny): fast enough for
# tests, and real masks.
MODEL = {"arch": "vit_tiny", "checkpoint": str(REPO / "models" / "sam_vit_tiny_synthetic.pth"), "device": "cpu"}
AMG = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.8}  # conf/model/vit_tiny.yaml
MODEL_OVERRIDES = ["model=vit_tiny", "amg.points_per_side=8"]
# The simulated annotator accepts at IoU 0.9; this weak model at 256 px makes few such
# masks (7%), too few to test a fit on ~15 scenes, so the tests learn IoU >= 0.75 (26%).
TEST_GOOD_IOU = 0.75
SIZE = (256, 256)


def record(mask: np.ndarray, predicted_iou: float = 0.9, stability: float = 0.95) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "predicted_iou": predicted_iou,
            "stability_score": stability, "bbox": mask_utils.toBbox(rle).tolist(), "area": int(mask.sum())}


def separable(n_images: int = 40, per_image: int = 30, seed: int = 0) -> verifier.Examples:
    """Masks whose goodness depends on two features plus noise."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    x = rng.normal(size=(n, len(verifier.FEATURES))).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 11] + rng.normal(scale=0.5, size=n)) > 0.8
    return verifier.Examples(x, y, np.repeat(np.arange(n_images), per_image), np.full(n, np.nan))


def test_features_see_boundary_agreement_and_shape():
    image = np.full((64, 64, 3), 40, np.uint8)
    image[16:48, 16:48] = (220, 60, 30)  # one object with a sharp, contrasted boundary
    right = np.zeros((64, 64), bool)
    right[16:48, 16:48] = True
    shifted = np.roll(right, 10, axis=1)  # half object, half background
    pieces = np.zeros((64, 64), bool)
    pieces[2:8, 2:8] = pieces[56:62, 56:62] = True
    f = verifier.mask_features([record(right), record(shifted), record(pieces)], image)
    assert f.shape == (3, len(verifier.FEATURES)) and np.isfinite(f).all()
    col = {name: i for i, name in enumerate(verifier.FEATURES)}
    assert f[0, col["contrast"]] > 2 * f[1, col["contrast"]]
    assert f[0, col["log_edge_ratio"]] > f[1, col["log_edge_ratio"]]
    assert f[0, col["bbox_fill"]] == pytest.approx(1.0) and f[2, col["bbox_fill"]] < 0.1
    assert f[0, col["log_components"]] == 0.0 and f[2, col["log_components"]] == pytest.approx(np.log(2))
    assert f[0, col["log_area_fraction"]] == pytest.approx(np.log10(32 * 32 / 64 ** 2))
    assert f[0, col["predicted_iou"]] == pytest.approx(0.9)


def test_threshold_reaches_the_target_precision_and_files_round_trip(tmp_path):
    fitted = verifier.fit(separable(), hidden=[8], target_precision=0.9)
    info = fitted.info
    assert info["target_met"] and info["precision_at_threshold"] >= 0.9
    assert 0 < info["recall_at_threshold"] < 1
    assert info["validation_auc"] > 0.9 and info["validation_log_loss"] < info["constant_log_loss"]
    # A lower target admits more masks; the curve is what amg.verifier_precision reads.
    assert fitted.threshold_for(0.6) < fitted.threshold_for(0.9) == pytest.approx(fitted.threshold)
    assert fitted.threshold_for(None) == fitted.threshold

    verifier.save(fitted, str(tmp_path / "v"))
    sha = verifier.verifier_identity(str(tmp_path / "v"))
    loaded = verifier.load_verifier(str(tmp_path / "v" / "model.pth"), expected_sha256=sha)
    x = separable(seed=1).features
    assert np.allclose(loaded.probabilities(x), fitted.probabilities(x))
    assert loaded.threshold == fitted.threshold and loaded.curve == fitted.curve

    meta = json.loads((tmp_path / "v" / "verifier.json").read_text())
    meta["threshold"] = 0.0
    (tmp_path / "v" / "verifier.json").write_text(json.dumps(meta))
    assert verifier.verifier_identity(str(tmp_path / "v")) != sha
    with pytest.raises(ValueError, match="changed after the run recorded them"):
        verifier.load_verifier(str(tmp_path / "v"), expected_sha256=sha)
    meta["features"] = meta["features"][:-1]
    (tmp_path / "v" / "verifier.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="retrain it"):
        verifier.load_verifier(str(tmp_path / "v"))
    with pytest.raises(FileNotFoundError, match="verifier.json"):
        verifier.load_verifier(str(tmp_path / "nowhere"))
    # Declared sizes are bounded before anything is allocated.
    meta["features"], meta["hidden"] = list(verifier.FEATURES), [10**9]
    (tmp_path / "v" / "verifier.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hidden layer sizes"):
        verifier.load_verifier(str(tmp_path / "v"))


def test_a_registered_folder_with_a_symbolic_link_is_refused(tmp_path):
    fitted = verifier.fit(separable(), hidden=[], target_precision=0.9)
    verifier.save(fitted, str(tmp_path / "v"))
    outside = tmp_path / "elsewhere.json"
    outside.write_text((tmp_path / "v" / "verifier.json").read_text())
    (tmp_path / "v" / "verifier.json").unlink()
    (tmp_path / "v" / "verifier.json").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        verifier.load_verifier(str(tmp_path / "v"))


def test_choose_threshold_prefers_recall_and_says_when_the_target_is_out_of_reach():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    curve = verifier.precision_curve(scores, labels)
    assert verifier.choose_threshold(curve, 0.8, min_accepted=1) == (0.5, True)   # 4 of 5 good
    assert verifier.choose_threshold(curve, 1.0, min_accepted=1) == (0.7, True)
    assert verifier.choose_threshold(curve, 1.0, min_accepted=4) == (0.5, False)  # best with >= 4 accepted
    assert verifier.auc(scores, labels) == pytest.approx(15 / 16)  # only 0.6 outranks a good mask (0.5)


def test_decisions_tables(tmp_path):
    x = separable(n_images=4, per_image=5).features
    columns = {name: x[:, i] for i, name in enumerate(verifier.FEATURES)}
    decisions = ["accepted", "edited", "deleted", "accepted"] * 5
    table = pa.table({**columns, "decision": decisions, "image": [f"sa_{i // 5}" for i in range(20)]})
    pq.write_table(table, tmp_path / "d.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "d.csv")
    for name in ("d.parquet", "d.csv"):
        got = verifier.read_decisions(str(tmp_path / name))
        assert got.labels.tolist() == [d == "accepted" for d in decisions]
        assert np.allclose(got.features, x) and len(np.unique(got.groups)) == 4
    pq.write_table(table.drop(["contrast"]), tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"missing.parquet: missing column\(s\) \['contrast'\]"):
        verifier.read_decisions(str(tmp_path / "missing.parquet"))
    pq.write_table(table.set_column(table.column_names.index("decision"), "decision", pa.array(["ok"] * 20)),
                   tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match=r"unknown decision value\(s\) \['ok'\]"):
        verifier.read_decisions(str(tmp_path / "odd.parquet"))


@pytest.fixture(scope="module")
def fitted_on_scenes():
    """A verifier fitted on the shipped model's masks of 12 synthetic training scenes,
    and those masks on 6 held-out test scenes."""
    torch.manual_seed(0)
    generate = build_generator(MODEL, AMG).generate
    train = verifier.synthetic_examples(generate, iter_scenes(scene_seeds("train", 500_000, 12), SIZE), TEST_GOOD_IOU)
    test = verifier.synthetic_examples(generate, iter_scenes(scene_seeds("test", 0, 6), SIZE), TEST_GOOD_IOU)
    return verifier.fit(train, hidden=[], target_precision=0.6), train, test


def test_fit_on_generator_masks_beats_a_constant_classifier_on_held_out_scenes(fitted_on_scenes):
    fitted, train, test = fitted_on_scenes
    assert len(test) >= 40 and 0.05 < test.labels.mean() < 0.6, "the held-out masks must hold both kinds"
    p = fitted.probabilities(test.features)
    constant = np.full(len(test), train.labels.mean())
    assert verifier.log_loss(p, test.labels) < verifier.log_loss(constant, test.labels)
    assert verifier.auc(p, test.labels) > 0.75
    # The labels are the simulated annotator's rule computed from the truth.
    assert np.array_equal(test.labels, test.best_iou >= TEST_GOOD_IOU)


def test_verifier_stage_registers_a_version(compose_config, tmp_path):
    cfg = compose_config("+stage=verifier", f"output={tmp_path}", *MODEL_OVERRIDES, "stage.synthetic.count=6",
                         "stage.synthetic.size=[256,256]", f"stage.good_iou={TEST_GOOD_IOU}", "stage.fit.hidden=[]",
                         "stage.fit.steps=300")
    summary = run_stage(cfg)
    folder = tmp_path / "models" / "verifier_v001"
    assert summary["version"] == "v001" and summary["path"] == str(folder)
    assert {p.name for p in folder.iterdir()} >= {"model.pth", "verifier.json", "eval.json", "config.yaml",
                                                   "train_summary.json"}
    meta = json.loads((folder / "verifier.json").read_text())
    assert meta["trained_with"]["amg"]["points_per_side"] == 8 and "verifier" not in meta["trained_with"]["amg"]
    assert meta["trained_with"]["good_iou"] == TEST_GOOD_IOU
    assert json.loads((folder / "eval.json").read_text())["validation_masks"] == summary["validation_masks"] > 0
    assert verifier.load_verifier(str(folder)).threshold == summary["threshold"]
    assert run_stage(cfg)["version"] == "v002"  # a new fit is a new version


def _masks_of(out) -> dict[str, list[dict]]:
    """Annotations per image source of a fully_auto output, and the decoded images."""
    found = {}
    for shard in sorted((out / "shards").iterdir()):
        for sample in iter_shard(str(shard)):
            found[sample.record["image"]["source"]] = (sample.record["annotations"],
                                                       np.asarray(Image.open(io.BytesIO(sample.jpg)).convert("RGB")))
    return found


def test_fully_auto_keeps_only_the_masks_the_verifier_accepts(compose_config, fitted_on_scenes, tmp_path, ray_local):
    images = tmp_path / "images"
    images.mkdir()
    for seed in scene_seeds("test", 100, 3):
        # JPEG: stored as given, so the test decodes the very pixels the worker scored.
        Image.fromarray(make_scene(seed, SIZE).image).save(images / f"scene_{seed}.jpg", quality=95)
    common = ["+stage=fully_auto", f"input={images}", *MODEL_OVERRIDES, "cluster.num_cpus=2"]
    run_stage(compose_config(*common, f"output={tmp_path / 'plain'}"))
    plain = _masks_of(tmp_path / "plain")

    # The fitted verifier with its threshold set at the median score of these masks, so
    # that the run must drop about half of them.
    fitted = fitted_on_scenes[0]
    scores = {src: fitted.score(anns, rgb) for src, (anns, rgb) in plain.items()}
    fitted.threshold = float(np.median(np.concatenate(list(scores.values()))))
    verifier.save(fitted, str(tmp_path / "verifier"))
    filtered_out = tmp_path / "filtered"
    summary = run_stage(compose_config(*common, f"output={filtered_out}", f"amg.verifier={tmp_path / 'verifier'}"))
    filtered = _masks_of(filtered_out)

    assert set(filtered) == set(plain)
    kept_total = 0
    for src, (anns, _) in plain.items():
        expected = [a["segmentation"]["counts"] for a, s in zip(anns, scores[src]) if s >= fitted.threshold]
        got = filtered[src][0]
        assert [a["segmentation"]["counts"] for a in got] == expected
        assert all(a["verifier_score"] >= fitted.threshold for a in got)
        assert np.allclose([a["verifier_score"] for a in got], [s for s in scores[src] if s >= fitted.threshold],
                           atol=1e-6)
        kept_total += len(got)
    assert 0 < kept_total == summary["masks"] < sum(len(a) for a, _ in plain.values())

    # The verifier is part of the dataset's identity: its files changing refuses a resume.
    import yaml

    saved = yaml.safe_load((filtered_out / "config.yaml").read_text())
    assert saved["verifier_sha256"] == verifier.verifier_identity(str(tmp_path / "verifier"))
    assert saved["amg"]["verifier"] == str(tmp_path / "verifier")
    fitted.threshold += 1e-3
    verifier.save(fitted, str(tmp_path / "verifier"))
    with pytest.raises(ConfigMismatch, match="verifier_sha256"):
        run_stage(compose_config(*common, f"output={filtered_out}", f"amg.verifier={tmp_path / 'verifier'}"))
