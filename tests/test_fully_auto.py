"""The fully_auto stage end to end: real Ray actors, the random-weights vit_tiny, real
tars read back with webdataset and pycocotools, a bad-file corpus, a poison input that
kills its worker, and SIGKILLs of a worker and of the driver followed by a rerun."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pycocotools.mask as mask_utils
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.dataset import manifest
from pipeline.dataset.shards import iter_shard
from pipeline.inputs.entries import InputError, enumerate_input
from pipeline.stages import run_stage
from tests.conftest import REPO, bad_corpus, encode, good_corpus, scene

# Small and fast: random weights keep next to no mask at the default thresholds.
FAST = ["amg.points_per_side=4", "amg.pred_iou_thresh=0", "amg.stability_score_thresh=0"]


def overrides(inp, out, checkpoint, *extra: str) -> list[str]:
    return ["+stage=fully_auto", f"input={inp}", f"output={out}", "model=vit_tiny", f"model.checkpoint={checkpoint}",
            *FAST, *extra]


def check_dataset(out: Path, inp: str) -> dict[str, dict]:
    """Checks the invariants of a finished dataset; returns its JSON records by key.

    Every enumerated image is in the manifest exactly once; every "ok" row has exactly
    one sample in the shard it names, and no shard holds anything else; every shard is
    a complete tar; every mask decodes to its image's size; ids are unique.
    """
    sources = [e.source for e in enumerate_input(inp, exclude=str(out))]
    table = manifest.read_table(str(out)).to_pylist()
    assert Counter(r["source"] for r in table) == Counter(sources), "manifest must list every input once"
    assert len({r["key"] for r in table}) == len(table)
    assert all(r["key"] == f"sa_{r['image_id']}" for r in table), "SA-1B names: sa_<image_id>"
    ok_rows = {r["key"]: r for r in table if r["status"] == manifest.STATUS_OK}
    records: dict[str, dict] = {}
    for shard in sorted((out / "shards").iterdir()):
        assert not shard.name.startswith("."), f"left-over temporary file {shard}"
        with tarfile.open(shard) as tar:  # raises on a truncated tar
            tar.getmembers()
        for sample in iter_shard(str(shard)):
            key = sample.key
            assert key not in records, f"{key} is in two shards"
            assert ok_rows[key]["shard"] == shard.name
            record = sample.record
            width, height = record["image"]["width"], record["image"]["height"]
            assert Image.open(io.BytesIO(sample.jpg)).size == (width, height)
            assert (ok_rows[key]["width"], ok_rows[key]["height"]) == (width, height)
            assert len(record["annotations"]) == ok_rows[key]["num_masks"]
            for ann in record["annotations"]:
                assert mask_utils.decode(ann["segmentation"]).shape == (height, width)
            records[key] = record
    assert set(records) == set(ok_rows), "shards and manifest must agree"
    image_ids = [r["image"]["image_id"] for r in records.values()]
    ann_ids = [a["id"] for r in records.values() for a in r["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)
    return records


def test_default_config_runs_the_samples_with_the_default_model(compose_config, tmp_path):
    cfg = compose_config("+stage=fully_auto", f"output={tmp_path / 'out'}")
    assert cfg.input == str(REPO / "sample" / "images")
    assert cfg.model.arch == "vit_tiny_512"
    assert cfg.model.checkpoint == str(REPO / "models" / "sam_vit_tiny_512_synthetic.pth")
    assert len(enumerate_input(cfg.input)) >= 5
    missing = compose_config("+stage=fully_auto", f"output={tmp_path / 'out'}",
                             f"model.checkpoint={tmp_path / 'no.pth'}")
    with pytest.raises(FileNotFoundError, match="model.checkpoint="):
        run_stage(missing)
    assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"


def test_config_groups_compose(compose_config):
    from sam_core import AMG_PRESETS

    cfg = compose_config("+stage=fully_auto", "output=/x", "amg=sa1b", "model=vit_h", "cluster=existing")
    assert {k: cfg.amg[k] for k in AMG_PRESETS["sa1b"]} == pytest.approx(AMG_PRESETS["sa1b"])
    assert cfg.model.arch == "vit_h" and cfg.model.checkpoint.endswith("sam_vit_h_4b8939.pth")
    assert cfg.cluster.address == "auto"


def test_nonexistent_input_fails_before_any_work(compose_config, tmp_path, tiny_checkpoint):
    cfg = compose_config(*overrides(tmp_path / "nope", tmp_path / "out", tiny_checkpoint))
    with pytest.raises(InputError, match="does not exist"):
        run_stage(cfg)
    assert not (tmp_path / "out").exists()


def test_corpus_end_to_end_then_rerun_skips_everything(compose_config, image_folder, tmp_path, tiny_checkpoint,
                                                        ray_local):
    inp = image_folder(with_bad=True)
    out = tmp_path / "out"
    cfg = compose_config(*overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=5", "stage.image.short_side=96"))
    summary = run_stage(cfg)

    records = check_dataset(out, str(inp))
    good = len(good_corpus()) + 1
    assert summary["images_ok"] == len(records) == good
    assert summary["images_failed"] == len(bad_corpus()) + 1  # + the broken link
    assert summary["units"] == summary["units_committed"] == 4
    assert summary["masks"] == sum(len(r["annotations"]) for r in records.values()) > 0

    rows = {r["source"].rsplit("/", 1)[-1]: r
            for r in manifest.read_table(str(out)).to_pylist() if "/a/" in r["source"]}
    by_key = {r["key"]: r for r in rows.values()}
    # Original JPEG bytes are kept; the large image is resized and its masks follow.
    plain = next(s for shard in sorted((out / "shards").iterdir()) for s in iter_shard(str(shard))
                 if s.key == rows["plain.jpg"]["key"])
    assert plain.jpg == good_corpus()["plain.jpg"]
    assert (rows["large.jpg"]["width"], rows["large.jpg"]["height"]) == (128, 96)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (48, 64)
    assert all(by_key[k]["image_id"] == records[k]["image"]["image_id"] for k in by_key)

    errors = {r["source"].rsplit("/", 1)[-1]: r for r in manifest.read_table(str(out), manifest.ERRORS_DIR).to_pylist()}
    for name, (_, reason) in bad_corpus().items():
        assert reason in errors[name]["reason"], (name, errors[name])
    assert "not found" in errors["gone.jpg"]["reason"]
    assert set(errors) == set(bad_corpus()) | {"gone.jpg"}

    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.checkpoint == str(tiny_checkpoint) and saved.amg.points_per_side == 4
    assert saved.code_version.startswith("git:")  # the dataset card reports it

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()}
    again = run_stage(cfg)
    assert again["units_skipped"] == 4 and again["units_committed"] == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()} == before

    # A dataset recorded before the SAM 2 settings existed resumes when they keep their
    # "as before" values, and is refused when one of them would change what is made.
    from pipeline.dataset.provenance import ConfigMismatch
    old = OmegaConf.load(out / "config.yaml")
    for key in ("use_m2m", "multimask_output", "mask_threshold"):
        del old.amg[key]
    del old.model_family
    OmegaConf.save(old, out / "config.yaml")
    assert run_stage(cfg)["units_skipped"] == 4
    with pytest.raises(ConfigMismatch, match=r"amg.use_m2m: null \(recorded\) vs true \(this run\)"):
        run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=5",
                                            "stage.image.short_side=96", "amg.use_m2m=true")))


def test_list_naming_missing_files(compose_config, tmp_path, tiny_checkpoint, ray_local):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "one.jpg").write_bytes(good_corpus()["plain.jpg"])
    listing = tmp_path / "list.txt"
    listing.write_text("photos/one.jpg\nphotos/two.jpg\nphotos\n")
    out = tmp_path / "out"
    summary = run_stage(compose_config(*overrides(listing, out, tiny_checkpoint)))
    assert summary["images_ok"] == 1 and summary["images_failed"] == 2
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"]
               for r in manifest.read_table(str(out), manifest.ERRORS_DIR).to_pylist()}
    assert "file not found" in reasons["two.jpg"] and "directory" in reasons["photos"]
    check_dataset(out, str(listing))


def test_existing_sa1b_tars_are_reannotated(compose_config, tmp_path, tiny_checkpoint, ray_local):
    import webdataset as wds

    (tmp_path / "sa1b").mkdir()
    with wds.TarWriter(str(tmp_path / "sa1b" / "sa_000042.tar")) as tar:
        for n in (1, 2):
            old = {"image": {"image_id": n, "width": 64, "height": 48, "file_name": f"sa_{n}.jpg"}, "annotations": []}
            tar.write({"__key__": f"sa_{n}", "jpg": encode(Image.fromarray(scene(64, 48, n)), "JPEG"), "json": old})
    out = tmp_path / "out"
    summary = run_stage(compose_config(*overrides(tmp_path / "sa1b" / "sa_000042.tar", out, tiny_checkpoint)))
    assert summary["images_ok"] == 2
    records = check_dataset(out, str(tmp_path / "sa1b" / "sa_000042.tar"))
    assert sorted(records) == ["sa_1", "sa_2"]  # SA-1B ids are kept


def test_poison_input_is_isolated_and_the_run_goes_on(compose_config, tmp_path, tiny_checkpoint, ray_local):
    inp = tmp_path / "images"
    inp.mkdir()
    for n in range(3):
        (inp / f"photo{n}.jpg").write_bytes(encode(Image.fromarray(scene(64, 48, n)), "JPEG"))
    (inp / "poison.jpg").write_bytes(good_corpus()["plain.jpg"])
    out = tmp_path / "out"
    cfg = compose_config(*overrides(inp, out, tiny_checkpoint, "stage.num_actors=1",
                                    "stage.fault_injection.kill_worker_on=[*/poison.jpg]"))
    summary = run_stage(cfg)
    assert summary["images_ok"] == 3 and summary["images_failed"] == 1
    assert summary["actors"][0]["restarts"] == 3  # pipelined try, then two careful tries
    assert len(summary["isolated"]) == 1
    (error,) = manifest.read_table(str(out), manifest.ERRORS_DIR).to_pylist()
    assert error["source"].endswith("poison.jpg") and error["phase"] == "isolated"
    assert "died 2 times" in error["reason"]
    check_dataset(out, str(inp))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_of_a_worker_then_of_the_driver_then_rerun_gives_every_image_once(compose_config, tmp_path,
                                                                                  tiny_checkpoint, ray_local):
    inp = tmp_path / "images"
    inp.mkdir()
    for n in range(12):
        (inp / f"photo{n:02d}.jpg").write_bytes(encode(Image.fromarray(scene(64, 48, n)), "JPEG"))
    out = tmp_path / "out"
    args = overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=2", "amg.points_per_side=6",
                     "cluster.num_cpus=2")
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    family: set[int] = set()
    try:
        def busy_worker():
            for process in _descendants(driver.pid):
                family.add(process.pid)
                try:
                    if "UnitWorker.process_unit" in " ".join(process.cmdline()):
                        return process
                except psutil.Error:
                    pass
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()

        os.kill(_wait_for(busy_worker, 120, "a worker annotating").pid, signal.SIGKILL)
        committed = lambda: len(manifest.committed_units(str(out))) >= 2  # noqa: E731
        _wait_for(committed, 120, "two committed units after the worker was killed")
        family.update(p.pid for p in _descendants(driver.pid))
        assert driver.poll() is None, "the run finished before the driver could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        for pid in family | {driver.pid}:  # whatever the dead driver left running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    assert "died during unit" in (tmp_path / "driver.log").read_text(), "the killed worker should have been replaced"
    assert len(manifest.committed_units(str(out))) < 6, "the driver was killed mid-run"

    summary = run_stage(compose_config(*args))
    assert summary["units_skipped"] >= 2 and summary["units_skipped"] + summary["units_committed"] == 6
    records = check_dataset(out, str(inp))
    assert len(records) == 12


@pytest.mark.parametrize("careful", [False, True])
def test_progress_is_batched_and_adds_up(compose_config, image_folder, tmp_path, tiny_checkpoint, monkeypatch, careful):
    """Progress messages sum to the unit's summary; normal tries batch them (one message
    per image cost as much as a small model), careful tries report every image."""
    from pipeline.dataset import plan
    from pipeline.execution import worker as worker_module

    inp = image_folder(with_bad=True)
    out = str(tmp_path / "out")
    cfg = OmegaConf.to_container(compose_config(*overrides(inp, out, tiny_checkpoint)), resolve=True)
    monkeypatch.setattr(worker_module, "PROGRESS_PERIOD_S", 3600.0)  # batch everything in normal tries
    source = {"kind": "grid", "model": cfg["model"], "amg": cfg["amg"]}
    worker = worker_module.UnitWorker(source, cfg["stage"]["image"], out, "sha")
    unit = plan.load_or_extend(out, enumerate_input(str(inp)), 1000).units[0]
    *progress, summary = list(worker.process_unit(unit, careful=careful))
    assert summary["unit"] == unit.index and summary["images"] == len(unit.items)
    assert sum(m["images"] for m in progress) == summary["images"]
    assert sum(m["masks"] for m in progress) == summary["masks"]
    assert sum(m["failed"] for m in progress) == summary["errors"] > 0
    assert len(progress) == (len(unit.items) if careful else 1)


def test_sam2_makes_a_valid_dataset_that_sam1_cannot_resume(compose_config, tmp_path, tiny_checkpoint, ray_local):
    """SAM 2.1 Hiera-T (random weights, at its real 1024-px input) on the sample photos:
    a valid SA-1B dataset whose every record names the family and the weights; resuming
    it with a SAM 1 model is refused, naming the family."""
    from pipeline.dataset.provenance import ConfigMismatch

    inp, out = REPO / "sample" / "images", tmp_path / "out"
    common = ["+stage=fully_auto", f"input={inp}", f"output={out}", *FAST, "stage.image.short_side=160"]
    summary = run_stage(compose_config(*common, "model=sam2.1_hiera_t", "model.checkpoint=null"))
    assert summary["images_ok"] == len(enumerate_input(str(inp))) and summary["masks"] > 0
    records = check_dataset(out, str(inp))
    assert {(r["image"]["model_family"], r["image"]["model_sha256"]) for r in records.values()} == {
        ("sam2", "random-init")}
    assert OmegaConf.load(out / "config.yaml").model_family == "sam2"
    validated = run_stage(compose_config("+stage=validate", f"input={out}", "stage.parallel=local"))
    assert validated["problems"] == 0 and validated["annotations"] == summary["masks"]
    with pytest.raises(ConfigMismatch, match=r'model_family: "sam2" \(recorded\) vs "sam" \(this run\)'):
        run_stage(compose_config(*common, "model=vit_tiny", f"model.checkpoint={tiny_checkpoint}"))


def _untrained_detector(folder: Path) -> Path:
    """A registered detector (its two files) with torchvision's initial weights: its
    boxes are arbitrary, which is all the prompts need here."""
    import json

    import torch

    from pipeline.models import detector

    settings = {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "min_size": 128, "max_size": 160,
                "detections_per_image": 20, "backbone_weights": None}
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    torch.save(detector.build_detector(settings).state_dict(), folder / detector.MODEL_FILE)
    (folder / detector.META_FILE).write_text(json.dumps({"model": settings, "version": "v001"}))
    return folder


def test_adaptive_and_object_prompting_make_datasets_that_say_how(compose_config, tmp_path, tiny_checkpoint,
                                                                  ray_local):
    """amg.prompting=adaptive and =objects (a registered detector's boxes, then adaptive
    points) make valid datasets whose records carry their prompts (a grid point, or the
    prompt box); objects needs a detector and records its identity; stages without boxes
    refuse objects instead of prompting something else."""
    from pipeline.models.detector import detector_identity
    from pipeline.models.loader import generator_kwargs

    inp = REPO / "sample" / "images"
    small = ["stage.image.short_side=96"]
    adaptive = run_stage(compose_config(*overrides(inp, tmp_path / "adaptive", tiny_checkpoint, *small,
                                                   "amg.points_per_side=8", "amg.prompting=adaptive")))
    records = check_dataset(tmp_path / "adaptive", str(inp))
    assert adaptive["masks"] > 0
    for record in records.values():
        w, h = record["image"]["width"], record["image"]["height"]
        for ann in record["annotations"]:
            (x, y), = ann["point_coords"]
            assert ((x / w * 8 - 0.5) % 1, (y / h * 8 - 0.5) % 1) == pytest.approx((0, 0), abs=1e-6)  # grid points

    with pytest.raises(ValueError, match="amg.objects.detector"):
        run_stage(compose_config(*overrides(inp, tmp_path / "none", tiny_checkpoint, "amg.prompting=objects")))
    assert not (tmp_path / "none").exists()
    folder = _untrained_detector(tmp_path / "models" / "detector_v001")
    out = tmp_path / "objects"
    summary = run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, *small, "amg.prompting=objects",
                                                  f"amg.objects.detector={folder}", "amg.objects.min_box_score=0")))
    records = check_dataset(out, str(inp))
    boxed = [a for r in records.values() for a in r["annotations"] if "prompt_box" in a]
    assert summary["masks"] > 0 and boxed and all(a["point_coords"] == [] for a in boxed)
    assert OmegaConf.load(out / "config.yaml").detector_sha256 == detector_identity(str(folder))
    validated = run_stage(compose_config("+stage=validate", f"input={out}", "stage.parallel=local"))
    assert validated["problems"] == 0
    with pytest.raises(ValueError, match="only fully_auto"):
        generator_kwargs({"prompting": "objects"})

    # A box file instead of a detector: its boxes, in the original images' pixels, prompt
    # the stored (resized) images; an image it does not name gets adaptive points only.
    import json

    photos = sorted(inp.glob("*.jpg"))
    named = photos[:2]
    coco = {"images": [{"id": i + 1, "file_name": p.name, "width": Image.open(p).width,
                        "height": Image.open(p).height} for i, p in enumerate(named)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "bbox": [20, 30, 120, 90], "category_id": 1}
                            for i in range(len(named))],
            "categories": [{"id": 1, "name": "thing"}]}
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="one source of boxes"):
        run_stage(compose_config(*overrides(inp, tmp_path / "both", tiny_checkpoint, "amg.prompting=objects",
                                            f"amg.objects.detector={folder}", f"amg.objects.boxes={box_file}")))
    out = tmp_path / "from_file"
    run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, *small, "amg.prompting=objects",
                                        f"amg.objects.boxes={box_file}")))
    records = check_dataset(out, str(inp))
    assert json.loads((out / "categories.json").read_text()) == [
        {"id": 1, "name": "thing"}]
    by_source = {Path(r["image"]["source"]).name: r for r in records.values()}
    for photo in photos:
        record = by_source[photo.name]
        boxes = {tuple(a["prompt_box"]) for a in record["annotations"] if "prompt_box" in a}
        if photo in named:
            scale = record["image"]["width"] / Image.open(photo).width
            (box,) = boxes  # the file's one box, its mask kept (thresholds 0), with its category
            assert box == pytest.approx((20 * scale, 30 * scale, 120 * scale, 90 * scale), abs=1e-3)
            assert [a["category_id"] for a in record["annotations"] if "prompt_box" in a] == [1]
        else:
            assert not boxes
    assert OmegaConf.load(out / "config.yaml").boxes_sha256
