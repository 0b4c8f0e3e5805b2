"""The annotate stage's server, queue, leases and saving, and the simulated annotator:
a real uvicorn server on loopback, real HTTP (httpx), real shards read back."""
from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.local_cluster import free_port
from pipeline.annotate.app import build
from pipeline.annotate.embeddings import exported_decoder
from pipeline.annotate.queue import load_queue
from pipeline.annotate.rle import counts_from_mask, mask_from_counts
from pipeline.annotate.server import BackgroundServer, create_app
from pipeline.annotate.session import ModelInfo, Session
from pipeline.annotate.simulated import SimulatedAnnotator
from pipeline.dataset import manifest
from pipeline.dataset.lease import LeaseHeld
from pipeline.dataset.listing import iter_samples
from pipeline.models.loader import load_sam, model_identity
from pipeline.stages import run_stage
from pipeline.truth.pools import Truth, write_scenes

from .dataset_factory import compose, make_dataset

TOKEN = "test-token-0123456789"


class Served:
    """A session and its server; ``api`` is an httpx client carrying the token."""

    def __init__(self, input_spec: Path, output: Path, checkpoint: Path, decoder_cache: Path,
                 images_per_unit: int = 2, lease_s: float = 60.0, output_lease=None, categories=None):
        self.queue = load_queue(str(input_spec), str(output), images_per_unit)
        sam = load_sam({"arch": "vit_tiny", "checkpoint": str(checkpoint), "device": "cpu"})
        identity = model_identity(str(checkpoint))
        decoder = exported_decoder(sam, "vit_tiny", identity, str(decoder_cache))
        model = ModelInfo("vit_tiny", identity, 256, [(1, 128, 16, 16)], decoder)
        image_cfg = {"short_side": 1500, "max_pixels": 10_000_000, "min_side": 16, "jpeg_quality": 95}
        self.session = Session(self.queue, str(output), sam, model, image_cfg, lease_s=lease_s,
                               check_output_lease=output_lease.confirm if output_lease else None,
                               categories=categories)
        self.server = BackgroundServer(create_app(self.session, TOKEN, max_body_bytes=200_000)).start()
        self.api = httpx.Client(base_url=self.server.url, headers={"X-Token": TOKEN}, timeout=60)

    def close(self) -> None:
        self.api.close()
        self.server.stop()
        self.session.close()


@pytest.fixture(scope="module")
def decoder_cache(tmp_path_factory) -> Path:
    """One export of the test model's decoder for the module (exported_decoder caches it)."""
    return tmp_path_factory.mktemp("decoder")


@pytest.fixture
def serve(tiny_checkpoint, decoder_cache):
    opened = []

    def start(input_spec: Path, output: Path, **kwargs) -> Served:
        served = Served(input_spec, output, tiny_checkpoint, decoder_cache, **kwargs)
        opened.append(served)
        return served

    yield start
    for served in opened:
        served.close()


def image_folder(root: Path, count: int = 3, size=(48, 64), bad: bool = False) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    if bad:
        (root / "img_1.png").write_bytes(b"not an image at all")
    return root


def a_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_rle_round_trip():
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (5, 7), (48, 64)):
        mask = rng.random(shape) > 0.5
        counts = counts_from_mask(mask)
        assert np.array_equal(mask_from_counts(counts, *shape), mask)
        rle = mask_utils.frPyObjects({"size": list(shape), "counts": counts}, *shape)
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_token_is_required_for_everything(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in"), tmp_path / "out")
    url = served.server.url
    paths = ["/", "/api/config", "/api/decoder.onnx", "/api/progress", "/api/images/sa_1", "/api/images/sa_1/image.jpg",
             "/api/images/sa_1/embedding", "/static/app.js", "/static/vendor/onnxruntime-web/LICENSE"]
    for path in paths:
        missing = httpx.get(url + path)
        assert missing.status_code == 401, path
        wrong = httpx.get(url + path, headers={"X-Token": TOKEN[:-1] + "x"})
        assert wrong.status_code == 403, path
        assert b"sa_" not in missing.content and b"sa_" not in wrong.content
    assert httpx.put(url + "/api/images/sa_1", json={"client": "c", "masks": []}).status_code == 401
    assert httpx.get(url + "/api/config", cookies={"sam_annotate_token": "nope"}).status_code == 403
    # The first page load moves the token from the URL into a cookie.
    first = httpx.get(url + f"/?token={TOKEN}")
    assert first.status_code == 303 and "sam_annotate_token" in first.headers["set-cookie"]
    assert httpx.get(url + "/api/config", cookies={"sam_annotate_token": TOKEN}).status_code == 200
    assert httpx.get(url + "/api/config", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_keys_and_paths_cannot_escape(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in"), tmp_path / "out")
    api = served.api
    for key in ("..%2F..%2Fetc%2Fpasswd", "sa_1.json", "sa_x", "img_0"):
        assert api.get(f"/api/images/{key}").status_code in (404, 422), key
    assert api.get("/api/images/sa_99").status_code == 404
    assert api.post("/api/lease", json={"client": "c", "key": "../sa_1"}).status_code == 422
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2Fsession.py", "/etc/passwd"):
        response = api.get(path)
        assert response.status_code == 404 and b"import" not in response.content, path
    assert api.get("/static/app.js").status_code == 200


def test_request_bodies_are_limited(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in"), tmp_path / "out")
    served.api.post("/api/lease", json={"client": "a"}).raise_for_status()
    big = {"client": "a", "masks": [{"uid": "m", "counts": [1] * 100_000, "provenance": "manual"}]}
    assert served.api.put("/api/images/sa_1", json=big).status_code == 413

    def chunks():  # no Content-Length: the limit holds for streamed bodies too
        yield json.dumps(big).encode()

    assert served.api.put("/api/images/sa_1", content=chunks(),
                          headers={"content-type": "application/json"}).status_code == 413


def test_two_annotators_never_share_an_image(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in", count=3), tmp_path / "out", lease_s=1.5)
    api = served.api
    a = api.post("/api/lease", json={"client": "a"}).json()
    b = api.post("/api/lease", json={"client": "b"}).json()
    assert a["key"] != b["key"]
    assert a["editable"] and b["editable"]
    assert api.post("/api/lease", json={"client": "b", "key": a["key"]}).status_code == 409
    mask = counts_from_mask(a_mask(48, 64, 5, 5, 20, 20))
    body = {"client": "b", "masks": [{"uid": "m1", "counts": mask, "provenance": "manual"}], "version": 0}
    assert api.put(f"/api/images/{a['key']}", json=body).status_code == 409
    assert api.get(f"/api/images/{a['key']}", params={"client": "b"}).json()["editable"] is False
    assert api.post("/api/renew", json={"client": "b", "key": a["key"]}).status_code == 409
    # A lease that is not renewed expires: then the image can go to someone else.
    time.sleep(1.0)
    assert api.post("/api/renew", json={"client": "a", "key": a["key"]}).json() == {"renewed": True}
    time.sleep(1.0)
    assert api.post("/api/lease", json={"client": "b", "key": a["key"]}).status_code == 409  # renewed: still a's
    time.sleep(0.7)
    assert api.post("/api/lease", json={"client": "b", "key": a["key"]}).status_code == 200
    assert api.put(f"/api/images/{a['key']}", json={**body, "client": "a"}).status_code == 409


def test_saves_survive_a_restart_and_units_commit_once(serve, tmp_path):
    folder, output = image_folder(tmp_path / "in", count=3), tmp_path / "out"
    served = serve(folder, output, images_per_unit=2)
    api = served.api
    first = api.post("/api/lease", json={"client": "a"}).json()
    assert first["key"] == "sa_1" and (first["width"], first["height"]) == (64, 48)
    embedding = api.get("/api/images/sa_1/embedding")
    assert embedding.headers["X-Embedding-Shape"] == "1,128,16,16" and len(embedding.content) == 128 * 16 * 16 * 2
    m1 = a_mask(48, 64, 5, 5, 20, 30)
    masks = [{"uid": "m1", "counts": counts_from_mask(m1), "provenance": "model_assisted", "clicks": 3,
              "seconds": 4.5, "annotator": "ann", "point_coords": [[10, 12]]}]
    assert first["version"] == 0
    assert (api.put("/api/images/sa_1", json={"client": "a", "masks": masks, "version": 0}).json()
            == {"saved": True, "committed": False, "version": 1})
    served.close()

    # A new server on the same output: the accepted mask is still there.
    served = serve(folder, output, images_per_unit=2)
    api = served.api
    view = api.post("/api/lease", json={"client": "a", "key": "sa_1"}).json()
    assert [m["uid"] for m in view["masks"]] == ["m1"]
    assert np.array_equal(mask_from_counts(view["masks"][0]["counts"], 48, 64), m1)
    assert view["version"] == 1
    saved = api.put("/api/images/sa_1", json={"client": "a", "masks": view["masks"], "done": True, "version": 1})
    assert saved.json()["committed"] is False
    second = api.post("/api/lease", json={"client": "a", "after": "sa_1"}).json()
    assert second["key"] == "sa_2"
    # A late save of the image the browser just left is kept and does not move its lease.
    api.put("/api/images/sa_1", json={"client": "a", "masks": view["masks"], "done": True,
                                      "version": saved.json()["version"]}).raise_for_status()
    assert served.session.leases.holder("sa_2") == "a" and served.session.leases.holder("sa_1") is None
    m2 = a_mask(48, 64, 30, 10, 60, 40)
    result = api.put("/api/images/sa_2", json={"client": "a", "done": True, "version": 0, "masks": [
        {"uid": "m2", "counts": counts_from_mask(m2), "provenance": "manual", "annotator": "ann"}]}).json()
    assert result["committed"] is True
    # Committed images are never written again.
    assert api.put("/api/images/sa_2", json={"client": "a", "masks": [], "version": 1}).status_code == 409
    assert api.post("/api/lease", json={"client": "a", "key": "sa_1"}).status_code == 409
    assert api.post("/api/lease", json={"client": "a", "after": "sa_2"}).json()["key"] == "sa_3"
    assert manifest.committed_units(str(output)) == {0}

    samples = {s.key: s for s in iter_samples(str(output))}
    assert sorted(samples) == ["sa_1", "sa_2"]
    anns = samples["sa_1"].record["annotations"]
    assert len(anns) == 1 and anns[0]["provenance"] == "model_assisted"
    assert (anns[0]["clicks"], anns[0]["seconds"], anns[0]["annotator"]) == (3, 4.5, "ann")
    assert np.array_equal(mask_utils.decode(anns[0]["segmentation"]).astype(bool), m1)
    assert anns[0]["area"] == m1.sum() and anns[0]["bbox"] == [5.0, 5.0, 15.0, 25.0]
    assert samples["sa_2"].record["annotations"][0]["provenance"] == "manual"
    table = manifest.read_table(str(output)).to_pylist()
    assert [r["key"] for r in table] == ["sa_1", "sa_2"] and all(r["status"] == "ok" for r in table)
    assert table[0]["source"].endswith("img_0.png") and len(table[0]["source_sha256"]) == 64
    assert samples["sa_1"].record["image"]["source_sha256"] == table[0]["source_sha256"]
    # Masks of the wrong size are refused, and nothing is saved.
    bad = {"client": "a", "masks": [{"uid": "x", "counts": [10, 5], "provenance": "manual"}], "version": 0}
    assert api.put("/api/images/sa_3", json=bad).status_code == 422


def test_next_images_are_embedded_ahead(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in", count=4), tmp_path / "out")
    served.api.post("/api/lease", json={"client": "a"}).raise_for_status()
    futures = served.session.images._futures
    assert list(futures) == ["sa_1", "sa_2", "sa_3"]  # this image and stage.lookahead (2) more
    for key in ("sa_2", "sa_3"):
        (embedding,) = futures[key].result(timeout=60)  # SAM 1: the embedding alone
        assert embedding.dtype == np.float16 and embedding.shape == (1, 128, 16, 16)
    # What the browser then asks for is already there: the same array, not recomputed.
    assert served.session.embedding("sa_2") is futures["sa_2"].result()


def test_bad_image_is_recorded_and_skipped(serve, tmp_path):
    output = tmp_path / "out"
    served = serve(image_folder(tmp_path / "in", count=3, bad=True), output, images_per_unit=3)
    api = served.api
    keys = []
    after = None
    while (view := api.post("/api/lease", json={"client": "a", "after": after}).json()) is not None:
        keys.append(view["key"])
        api.put(f"/api/images/{view['key']}", json={"client": "a", "masks": [], "done": True,
                                                    "version": view["version"]}).raise_for_status()
        after = view["key"]
    assert keys == ["sa_1", "sa_3"]  # sa_2 (img_1.png) does not decode
    assert api.get("/api/images/sa_2").status_code == 410
    table = {r["key"]: r for r in manifest.read_table(str(output)).to_pylist()}
    assert table["sa_2"]["status"] == "error" and table["sa_1"]["status"] == "ok"
    reasons = manifest.read_table(str(output), manifest.ERRORS_DIR).to_pylist()
    assert [r["key"] for r in reasons] == ["sa_2"] and "not a readable image" in reasons[0]["reason"]
    assert reasons[0]["phase"] == "decode"
    assert api.get("/api/progress").json() == {"images": 3, "done": 3, "failed": 1, "units": 1, "units_committed": 1,
                                               "lost": None}


def test_dataset_masks_open_prefilled_as_automatic(serve, tmp_path):
    source = make_dataset(tmp_path / "auto", num_shards=1, images_per_shard=2, masks_per_image=(3, 2),
                          sizes=((48, 64),))
    output = tmp_path / "out"
    served = serve(tmp_path / "auto", output, images_per_unit=2)
    api = served.api
    view = api.post("/api/lease", json={"client": "a"}).json()
    assert [m["provenance"] for m in view["masks"]] == ["automatic"] * 3
    truth = source.samples[0].masks
    assert np.array_equal(mask_from_counts(view["masks"][0]["counts"], 48, 64), truth[0].astype(bool))
    # Unreviewed automatic masks block "done"; accept one, edit one, delete one.
    masks = view["masks"]
    assert api.put(f"/api/images/{view['key']}", json={"client": "a", "masks": masks, "done": True,
                                                       "version": 0}).status_code == 422
    edited = mask_from_counts(masks[1]["counts"], 48, 64).copy()
    edited[:5, :5] = True
    reviewed = [{**masks[0], "provenance": "automatic_accepted", "annotator": "ann"},
                {**masks[1], "counts": counts_from_mask(edited), "provenance": "automatic_edited", "seconds": 2.0}]
    api.put(f"/api/images/{view['key']}", json={"client": "a", "masks": reviewed, "done": True,
                                                "version": 0}).raise_for_status()
    nxt = api.post("/api/lease", json={"client": "a", "after": view["key"]}).json()
    api.put(f"/api/images/{nxt['key']}", json={"client": "a", "masks": [], "done": True, "version": 0}).json()
    record = next(iter_samples(str(output))).record
    original = source.samples[0].record["annotations"][0]
    first, second = record["annotations"]
    assert first["provenance"] == "automatic_accepted" and first["predicted_iou"] == original["predicted_iou"]
    assert second["provenance"] == "automatic_edited" and second["predicted_iou"] == 1.0
    assert np.array_equal(mask_utils.decode(second["segmentation"]).astype(bool), edited)


def test_simulated_annotator_through_the_stage(tmp_path):
    """The stage as the command runs it (default model), annotated by the scripted
    annotator over HTTP; the output reads back as a dataset and validates."""
    truth_path = write_scenes(tmp_path / "scenes", 2, (256, 256))
    port = free_port()
    cfg = compose("annotate", tmp_path / "scenes" / "images", tmp_path / "out",
                  [f"stage.port={port}", f"stage.token={TOKEN}", "stage.exit_when_done=true",
                   "stage.images_per_unit=1"])
    summary: dict = {}
    stage = threading.Thread(target=lambda: summary.update(run_stage(cfg)))
    stage.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/api/progress", headers={"X-Token": TOKEN}).raise_for_status()
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the stage's server did not come up"
            time.sleep(0.2)
    # One writer per output: a second server (or any run) on it is refused while it runs.
    with pytest.raises(LeaseHeld):
        build(cfg)
    truth = Truth(truth_path)
    report = SimulatedAnnotator(url, TOKEN, lambda view: truth(view["source"]), max_clicks=8).run()
    stage.join(60)
    assert not stage.is_alive() and summary["units_committed"] == 2

    truth = json.loads(truth_path.read_text())
    assert report["images"] == 2 and report["masks"] == len(truth["annotations"])
    assert 1 <= report["noc85"] <= report["noc90"] <= 8
    assert report["model_ms_per_click"]["median"] > 0
    samples = list(iter_samples(str(tmp_path / "out")))
    assert sorted(s.key for s in samples) == ["sa_1", "sa_2"]
    anns = [a for s in samples for a in s.record["annotations"]]
    assert len(anns) == report["masks"]
    assert {a["provenance"] for a in anns} == {"model_assisted"} and {a["annotator"] for a in anns} == {"simulated"}
    assert sorted(a["clicks"] for a in anns) == sorted(m["clicks"] for m in report["per_mask"])
    # The saved masks are the decoder's last answers, one per object in order: their
    # IoU with the truth is the report's.
    gt = {img["file_name"]: [a["segmentation"] for a in truth["annotations"] if a["image_id"] == img["id"]]
          for img in truth["images"]}
    sources = {r["key"]: Path(r["source"]).name for r in manifest.read_table(str(tmp_path / "out")).to_pylist()}
    for sample in samples:
        saved = [a["segmentation"] for a in sample.record["annotations"]]
        ious = np.diag(np.asarray(mask_utils.iou(saved, gt[sources[sample.key]], [0] * len(saved))))
        reported = [m["ious"][-1] for m in report["per_mask"] if m["key"] == sample.key]
        np.testing.assert_allclose(ious, reported, atol=1e-6)
    validate = run_stage(compose("validate", tmp_path / "out"))
    assert validate["problems"] == 0, validate
    run_stage(compose("export_coco", tmp_path / "out"))
    from pycocotools.coco import COCO

    coco = COCO(str(tmp_path / "out" / "coco" / "instances.json"))
    assert len(coco.getAnnIds()) == report["masks"] and len(coco.getImgIds()) == 2


# --- what a save acknowledged is, and what stale or lost writers cannot do -------------------
def test_a_save_racing_its_units_commit_is_in_the_commit_or_refused(serve, tmp_path, monkeypatch):
    """An edit of a done image, slowed between its checks and its write, while another
    image's done-save commits the unit: the commit holds the edit (it waited for it)."""
    from pipeline.annotate.store import Store

    output = tmp_path / "out"
    served = serve(image_folder(tmp_path / "in", count=2), output, images_per_unit=2)
    api = served.api
    first = api.post("/api/lease", json={"client": "a"}).json()
    second = api.post("/api/lease", json={"client": "b"}).json()
    old, new = a_mask(48, 64, 2, 2, 10, 10), a_mask(48, 64, 20, 20, 40, 40)
    mask = {"uid": "m", "provenance": "manual"}
    done = api.put(f"/api/images/{first['key']}", json={"client": "a", "done": True, "version": 0,
                                                       "masks": [{**mask, "counts": counts_from_mask(old)}]}).json()
    original_save = Store.save

    def slow_save(self, state):
        if state.key == first["key"]:
            time.sleep(1.0)  # the edit is between its checks and its write
        return original_save(self, state)

    monkeypatch.setattr(Store, "save", slow_save)
    answers = {}

    def edit():
        answers["edit"] = api.put(f"/api/images/{first['key']}", json={
            "client": "a", "done": True, "version": done["version"],
            "masks": [{**mask, "counts": counts_from_mask(new)}]})

    editing = threading.Thread(target=edit)
    editing.start()
    time.sleep(0.3)
    commit = api.put(f"/api/images/{second['key']}", json={"client": "b", "masks": [], "done": True, "version": 0})
    editing.join()
    assert commit.json()["committed"] is True
    assert answers["edit"].status_code == 200 and answers["edit"].json()["saved"] is True
    record = {s.key: s.record for s in iter_samples(str(output))}[first["key"]]
    assert np.array_equal(mask_utils.decode(record["annotations"][0]["segmentation"]).astype(bool), new)


def test_a_stale_tab_cannot_overwrite_another_annotators_work(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in", count=3), tmp_path / "out", images_per_unit=3, lease_s=1.0)
    api = served.api
    a_view = api.post("/api/lease", json={"client": "a"}).json()
    key = a_view["key"]
    a_masks = [{"uid": "a1", "counts": counts_from_mask(a_mask(48, 64, 1, 1, 9, 9)), "provenance": "manual"}]
    saved = api.put(f"/api/images/{key}", json={"client": "a", "masks": a_masks, "version": 0}).json()
    time.sleep(1.3)  # a idles past its lease; b opens the image, adds a mask, marks it done, moves on
    b_view = api.post("/api/lease", json={"client": "b", "key": key}).json()
    assert b_view["version"] == saved["version"] == 1
    b_masks = [*b_view["masks"], {"uid": "b1", "counts": counts_from_mask(a_mask(48, 64, 30, 5, 50, 25)),
                                  "provenance": "manual"}]
    api.put(f"/api/images/{key}", json={"client": "b", "masks": b_masks, "done": True, "version": 1}).raise_for_status()
    api.post("/api/lease", json={"client": "b", "after": key}).raise_for_status()
    # a's tab comes back: its renew is refused, and so is its save, which is offered b's state.
    renew = api.post("/api/renew", json={"client": "a", "key": key, "version": saved["version"]})
    assert renew.status_code == 409
    stale = api.put(f"/api/images/{key}", json={"client": "a", "masks": a_masks, "version": saved["version"]})
    assert stale.status_code == 409 and "saved by someone else" in stale.json()["detail"]
    current = stale.json()["current"]
    assert [m["uid"] for m in current["masks"]] == ["a1", "b1"] and current["done"] and current["version"] == 2
    state = served.session.state(key)
    assert [m["uid"] for m in state.masks] == ["a1", "b1"] and state.done


def test_a_server_that_lost_the_output_accepts_no_save(serve, tmp_path):
    from pipeline import storage
    from pipeline.dataset import lease

    folder, output = image_folder(tmp_path / "in", count=2), tmp_path / "out"
    held = lease.Lease(str(output), ttl_s=60)
    held.acquire()
    try:
        served = serve(folder, output, images_per_unit=2, output_lease=held)
        api = served.api
        view = api.post("/api/lease", json={"client": "a"}).json()
        masks = [{"uid": "m", "counts": counts_from_mask(a_mask(48, 64, 1, 1, 9, 9)), "provenance": "manual"}]
        api.put(f"/api/images/{view['key']}", json={"client": "a", "masks": masks, "version": 0}).raise_for_status()
        # Another server takes the output over (its lease file replaces ours).
        holder = lease.read(str(output))
        storage.write_json(str(output / lease.LEASE_FILE), {**holder.__dict__, "owner": "another-server"})
        refused = api.put(f"/api/images/{view['key']}", json={"client": "a", "masks": [], "done": True, "version": 1})
        assert refused.status_code == 503 and refused.json()["lost"] is True
        assert [m["uid"] for m in served.session.store.load(view["key"]).masks] == ["m"]  # nothing written
        assert api.post("/api/lease", json={"client": "b"}).status_code == 503
        assert "another-server" in api.get("/api/progress").json()["lost"]
        assert api.get(f"/api/images/{view['key']}", params={"client": "a"}).json()["editable"] is False
    finally:
        held.release()


def test_non_finite_numbers_are_refused(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in", count=1), tmp_path / "out")
    api = served.api
    view = api.post("/api/lease", json={"client": "a"}).json()
    counts = counts_from_mask(a_mask(48, 64, 1, 1, 9, 9))
    for field, value in (("point_coords", [[float("nan"), 3.0]]), ("seconds", float("inf"))):
        body = json.dumps({"client": "a", "version": 0, "masks": [
            {"uid": "m", "counts": counts, "provenance": "manual", field: value}]})  # json.dumps writes NaN
        response = api.put(f"/api/images/{view['key']}", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (field, response.text)
    assert served.session.store.load(view["key"]) is None


def test_a_malformed_prefill_mask_is_left_out_and_the_queue_goes_on(serve, tmp_path):
    import tarfile

    source = make_dataset(tmp_path / "auto", num_shards=1, images_per_shard=2, masks_per_image=(2, 2),
                          sizes=((48, 64),))
    shard = tmp_path / "auto" / "shards" / "sa_000000.tar"
    members = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            members[member.name] = tar.extractfile(member).read()
    first_json = sorted(n for n in members if n.endswith(".json"))[0]
    record = json.loads(members[first_json])
    record["annotations"][0]["segmentation"]["size"] = [20000, 10000]  # claims 200M pixels on a 48x64 image
    members[first_json] = json.dumps(record).encode()
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    served = serve(tmp_path / "auto", tmp_path / "out", images_per_unit=2)
    api = served.api
    keys = []
    after = None
    while (view := api.post("/api/lease", json={"client": "a", "after": after}).json()) is not None:
        keys.append(view["key"])
        if view["dropped"]:
            assert len(view["masks"]) == 1 and "RLE size [20000, 10000]" in view["dropped"][0]
        reviewed = [{**m, "provenance": "automatic_accepted"} for m in view["masks"]]
        api.put(f"/api/images/{view['key']}", json={"client": "a", "masks": reviewed, "done": True,
                                                    "version": view["version"]}).raise_for_status()
        after = view["key"]
    assert len(keys) == 2 and served.session.finished()
    assert sum(len(s.record["annotations"]) for s in iter_samples(str(tmp_path / "out"))) == 3
    assert len(source.samples) == 2


def test_what_a_killed_server_left_half_written_is_cleaned_at_the_next_start(serve, tmp_path):
    folder, output = image_folder(tmp_path / "in", count=2), tmp_path / "out"
    serve(folder, output).close()
    leftovers = [output / "annotate" / "work" / ".sa_1.json.tmp-0123abcd",
                 output / "shards" / ".sa_000000.tar.tmp-4567cdef"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    serve(folder, output)
    assert not any(path.exists() for path in leftovers)


def test_a_label_outside_the_label_set_is_refused(serve, tmp_path):
    served = serve(image_folder(tmp_path / "in", count=1), tmp_path / "out",
                   categories=[{"id": 1, "name": "cell", "supercategory": "object"}])
    api = served.api
    assert api.get("/api/config").json()["labels"] == [{"id": 1, "name": "cell"}]
    view = api.post("/api/lease", json={"client": "a"}).json()
    counts = counts_from_mask(a_mask(48, 64, 1, 1, 9, 9))
    mask = {"uid": "m", "counts": counts, "provenance": "manual"}
    refused = api.put(f"/api/images/{view['key']}", json={"client": "a", "version": 0,
                                                          "masks": [{**mask, "category_id": 7}]})
    assert refused.status_code == 422 and "category_id 7 is not a label" in refused.text
    saved = api.put(f"/api/images/{view['key']}", json={"client": "a", "version": 0,
                                                        "masks": [{**mask, "category_id": 1}]})
    assert saved.status_code == 200, saved.text
    assert api.get(f"/api/images/{view['key']}").json()["masks"][0]["category_id"] == 1


def test_the_label_set_follows_the_output_and_the_input(tmp_path):
    """stage.labels labels an output for good: reopened without them it keeps them, and
    another set is refused; labels that would rename an input dataset's are refused."""
    from pipeline.annotate.app import _categories
    from pipeline.dataset.listing import read_categories, write_categories
    from pipeline.dataset.provenance import ConfigMismatch

    images, out = image_folder(tmp_path / "in", count=1), tmp_path / "out"
    out.mkdir()
    assert _categories(None, str(images), str(out)) == [] and read_categories(str(out)) is None
    made = _categories(["cell", "debris"], str(images), str(out))
    assert [c["name"] for c in made] == ["cell", "debris"] == [c["name"] for c in read_categories(str(out))]
    assert _categories(None, str(images), str(out)) == made  # reopened without labels
    with pytest.raises(ConfigMismatch, match="one label set"):
        _categories(["dog"], str(images), str(out))
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    write_categories(str(labelled), [{"id": 1, "name": "dog", "supercategory": "animal"},
                                     {"id": 2, "name": "cat", "supercategory": "animal"}])
    with pytest.raises(ConfigMismatch, match="leave stage.labels out"):
        _categories(["cell"], str(labelled), str(tmp_path / "out2"))
    assert [c["name"] for c in _categories(None, str(labelled), str(tmp_path / "out2"))] == ["dog", "cat"]
