"""The annotation tool in a real headless browser (Debian's Chromium driven by
Playwright), against the stage started as the command line starts it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.annotate.simulated import Decoder, read_features
from pipeline.dataset.listing import iter_samples
from pipeline.truth.pools import write_scenes
from sam_core.metrics import next_click

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or shutil.which("chromium-browser") or "")
SCREENSHOT = os.environ.get("ANNOTATE_SCREENSHOT")  # where to keep the README's screenshot


def _chromium() -> str:
    if CHROMIUM and Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: .ci/run installs it with apt-get (apt-get install -y chromium)")
    pytest.skip("Chromium is not installed (apt-get install -y chromium)")


class Stage:
    """``python -m pipeline.run +stage=annotate ...`` in a subprocess; ``url`` is what it printed."""

    def __init__(self, tmp: Path, images: Path, output: Path, *overrides: str) -> None:
        command = [sys.executable, "-m", "pipeline.run", "+stage=annotate", f"input={images}", f"output={output}",
                   "stage.port=0", "stage.images_per_unit=1", f"hydra.run.dir={tmp / 'hydra'}", *overrides]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.output = output
        self.process = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                break
            self.lines.append(line)
            if match := re.search(r"open (http://\S+)", line):
                self.url = match.group(1)
                self.base, self.token = self.url.split("/?token=")
                return
        self.stop()
        raise RuntimeError("the annotate stage did not print its URL:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # as Ctrl-C: the stage stops cleanly
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    truth = json.loads(write_scenes(root, 2, (256, 256)).read_text())
    return root, truth


@pytest.fixture(scope="module")
def stage(scenes, tmp_path_factory):
    """One stage for the module: starting it (a process, the model, the export) is most
    of these tests' time."""
    root, _ = scenes
    tmp = tmp_path_factory.mktemp("stage")
    started = Stage(tmp, root / "images", tmp / "out")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser download is never used: Debian's Chromium, by path.
        chromium = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


def truth_masks(truth: dict, file_name: str) -> list[np.ndarray]:
    image = next(i for i in truth["images"] if i["file_name"] == file_name)
    return [mask_utils.decode(a["segmentation"]).astype(bool)
            for a in truth["annotations"] if a["image_id"] == image["id"]]


def screen_point(page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) is on the screen, from the page's own zoom and pan."""
    rect = page.locator("#view").bounding_box()
    zoom = page.evaluate("window.sam.state.zoom")
    return rect["x"] + zoom["tx"] + x * zoom["s"], rect["y"] + zoom["ty"] + y * zoom["s"]


def press_and_wait_saved(page, key: str) -> None:
    """Presses ``key`` and waits for the save it makes to be answered 200."""
    with page.expect_response(lambda r: r.request.method == "PUT" and "/api/images/" in r.url, timeout=30_000) as saved:
        page.keyboard.press(key)
    assert saved.value.ok, saved.value.status


def test_click_accept_brush_next_and_saved_record(browser, scenes, stage):
    root, truth = scenes
    output = stage.output
    page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)  # CSP: for Playwright's own eval
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(stage.url)
    page.wait_for_function("window.sam && window.sam.state.ready", timeout=90_000)
    view = page.evaluate("window.sam.state.view")
    assert view["key"] == "sa_1" and view["editable"]
    page.fill("#annotator", "tester")
    page.locator("#annotator").press("Enter")

    # Click the centre of the largest object: the decoder in the page answers.
    gt = max(truth_masks(truth, Path(view["source"]).name), key=lambda m: m.sum())
    (x, y), _ = next_click(gt, None)
    page.mouse.click(*screen_point(page, x + 0.5, y + 0.5))
    page.wait_for_function("window.sam.stats.clicks.length === 1 && window.sam.state.current.mask", timeout=30_000)
    candidate = page.evaluate("window.sam.state.current.candidate")
    press_and_wait_saved(page, "Enter")
    if SCREENSHOT:
        page.keyboard.press("Tab")  # select it, so that the screenshot shows a selected mask
        page.screenshot(path=SCREENSHOT)
        page.keyboard.press("Escape")

    # Correct it with the brush: a stroke across an empty corner, then accept.
    page.keyboard.press("Tab")
    page.keyboard.press("d")
    brush = page.evaluate("window.sam.state.brush")
    start, end = (20.0, 236.0), (60.0, 236.0)
    page.mouse.move(*screen_point(page, *start))
    page.mouse.down()
    page.mouse.move(*screen_point(page, *end), steps=8)
    page.mouse.up()
    press_and_wait_saved(page, "Enter")
    clicked = page.evaluate("window.sam.state.masks[0].point_coords")

    # Next image, then mark the first done: its unit is committed.
    page.keyboard.press("n")
    page.wait_for_function("window.sam.state.ready && window.sam.state.view.key === 'sa_2'", timeout=60_000)
    page.keyboard.press("p")
    page.wait_for_function("window.sam.state.ready && window.sam.state.view.key === 'sa_1'", timeout=60_000)
    page.keyboard.press("m")
    page.wait_for_function("window.sam.state.ready && window.sam.state.view.key === 'sa_2'", timeout=60_000)

    # On the next image: a box, its mask, undo and redo, candidates, zoom and fit.
    page.keyboard.press("b")
    page.mouse.move(*screen_point(page, 40, 40))
    page.mouse.down()
    page.mouse.move(*screen_point(page, 140, 120), steps=4)
    page.mouse.up()
    page.wait_for_function("window.sam.stats.clicks.length === 2 && window.sam.state.current.box", timeout=30_000)
    assert page.evaluate("window.sam.state.current.clicks") == 2  # a box counts as its two corners
    page.keyboard.press("Control+z")
    assert page.evaluate("window.sam.state.current === null")
    page.keyboard.press("Control+Shift+z")
    assert page.evaluate("window.sam.state.current.box.map(Math.round)") == [40, 40, 140, 120]
    page.keyboard.press("Escape")
    page.keyboard.press("c")
    page.mouse.click(*screen_point(page, 200.5, 60.5))
    page.wait_for_function("window.sam.stats.clicks.length === 3 && window.sam.state.current.mask", timeout=30_000)
    page.keyboard.press("3")
    assert page.evaluate("window.sam.state.current.candidate") == 3
    fitted = page.evaluate("window.sam.state.zoom.s")
    page.keyboard.press("+")
    assert page.evaluate("window.sam.state.zoom.s") > fitted * 1.2
    page.keyboard.press("0")
    assert abs(page.evaluate("window.sam.state.zoom.s") - fitted) < 1e-6
    assert not errors, errors

    (sample,) = list(iter_samples(str(output)))
    assert sample.key == "sa_1"
    (ann,) = sample.record["annotations"]
    assert ann["provenance"] == "model_assisted" and ann["annotator"] == "tester" and ann["clicks"] == 1
    assert 0 < ann["seconds"] < 600
    saved = mask_utils.decode(ann["segmentation"]).astype(bool)

    # The expected mask: the same ONNX decoder in Python, on the embedding the page got.
    api = httpx.Client(base_url=stage.base, headers={"X-Token": stage.token})
    features = read_features(api.get("/api/images/sa_1/embedding"))
    config = api.get("/api/config").json()["model"]
    decoder = Decoder(api.get(config["decoder_url"]).content, config["img_size"], config["mask_input_size"],
                      config["family"])
    scores, low_res = decoder(features, [tuple(clicked[0])], [1], (256, 256), None)
    best = 1 + int(np.argmax(scores[1:]))
    assert candidate == best
    expected = decoder.mask(low_res[best], (256, 256))
    # The stroke: every pixel within the brush radius of the segment (the page
    # stamps discs along it), nothing beyond it outside the clicked mask.
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    t = np.clip(((xx - start[0]) * (end[0] - start[0])) / ((end[0] - start[0]) ** 2), 0, 1)
    distance = np.hypot(xx - (start[0] + t * (end[0] - start[0])), yy - start[1])
    assert saved[distance <= brush / 2 - 1].all()
    assert not saved[(distance > brush / 2 + 1) & ~expected].any()
    far = distance > brush / 2 + 1
    agreement = (saved[far] == expected[far]).mean()
    assert agreement >= 0.999, f"the page's mask agrees with the Python decoder on {agreement:.5f} of pixels"


def test_page_and_api_refuse_requests_without_the_token(browser, stage):
    page = browser.new_page()
    response = page.goto(stage.base + "/")
    assert response.status == 401 and "sa_" not in page.content()
    response = page.goto(stage.base + "/?token=wrong")
    assert response.status == 403
    for path in ("/api/config", "/api/images/sa_1/image.jpg", "/api/images/sa_1/embedding", "/static/app.js"):
        assert page.request.get(stage.base + path).status == 401, path
    # With the token the page opens, and the cookie it sets lets the API through.
    assert page.goto(stage.url).status == 200
    assert page.request.get(stage.base + "/api/config").status == 200


def test_prefilled_masks_select_delete_accept_all(browser, tmp_path):
    """A fully_auto-style dataset as input: its masks open as automatic; delete one
    picked with the Select tool, accept the rest with Shift+A, mark done."""
    from .dataset_factory import make_dataset

    source = make_dataset(tmp_path / "auto", num_shards=1, images_per_shard=1, masks_per_image=(4,), sizes=((96, 128),))
    stage = Stage(tmp_path, tmp_path / "auto", tmp_path / "out")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        page.goto(stage.url)
        page.wait_for_function("window.sam && window.sam.state.ready", timeout=90_000)
        assert page.evaluate("window.sam.state.masks.map(m => m.provenance)") == ["automatic"] * 4
        masks = [m.astype(bool) for m in source.samples[0].masks]
        # A pixel of mask 1 that no later mask covers: the Select tool picks mask 1 there.
        free = masks[1] & ~np.any(masks[2:], axis=0)
        ys, xs = np.nonzero(free)
        page.keyboard.press("v")
        page.mouse.click(*screen_point(page, xs[len(xs) // 2] + 0.5, ys[len(ys) // 2] + 0.5))
        assert page.evaluate("window.sam.state.selected") == 1
        press_and_wait_saved(page, "Delete")
        assert page.evaluate("window.sam.state.masks.length") == 3
        page.keyboard.press("Shift+A")
        page.wait_for_function("window.sam.state.masks.every(m => m.provenance === 'automatic_accepted')",
                               timeout=10_000)
        page.keyboard.press("m")
        page.wait_for_function("document.getElementById('status').textContent.includes('no more images')",
                               timeout=30_000)
        (sample,) = list(iter_samples(str(tmp_path / "out")))
        anns = sample.record["annotations"]
        assert [a["provenance"] for a in anns] == ["automatic_accepted"] * 3
        saved = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        for got, want in zip(saved, [masks[0], masks[2], masks[3]]):
            assert np.array_equal(got, want)
        originals = source.samples[0].record["annotations"]
        assert [a["predicted_iou"] for a in anns] == [originals[i]["predicted_iou"] for i in (0, 2, 3)]
    finally:
        stage.stop()


def test_sam2_page_answers_as_the_decoder_in_python(browser, scenes, tmp_path, tiny_checkpoint):
    """SAM 2.1 Hiera-T (random weights) in the tool: the page receives the embedding and
    the two high-resolution maps, runs SAM 2's exported graph on WebAssembly and shows
    the same masks as that graph under onnxruntime in Python, for a first click (best of
    three) and a refining second click (mask input from the first answer)."""
    root, truth = scenes
    started = Stage(tmp_path, root / "images", tmp_path / "out", "model=sam2.1_hiera_t", "model.checkpoint=null")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(started.url)
        page.wait_for_function("window.sam && window.sam.state.ready", timeout=120_000)
        view = page.evaluate("window.sam.state.view")
        size = (view["height"], view["width"])
        api = httpx.Client(base_url=started.base, headers={"X-Token": started.token})
        config = api.get("/api/config").json()["model"]
        assert config["family"] == "sam2" and len(config["feature_shapes"]) == 3
        features = read_features(api.get(f"/api/images/{view['key']}/embedding"))
        assert [list(f.shape) for f in features] == config["feature_shapes"]
        decoder = Decoder(api.get(config["decoder_url"]).content, config["img_size"], config["mask_input_size"],
                          "sam2")

        gt = max(truth_masks(truth, Path(view["source"]).name), key=lambda m: m.sum())
        (x, y), _ = next_click(gt, None)
        page.mouse.click(*screen_point(page, x + 0.5, y + 0.5))
        page.wait_for_function("window.sam.stats.clicks.length === 1 && window.sam.state.current.mask", timeout=30_000)
        points = [tuple(p) for p in page.evaluate("window.sam.state.current.points")]
        shown = np.array(page.evaluate("Array.from(window.sam.state.current.mask)"), bool).reshape(size)
        scores, low_res = decoder(features, points, [1], size, None)
        best = 1 + int(np.argmax(scores[1:]))
        assert page.evaluate("window.sam.state.current.candidate") == best
        assert (shown == decoder.mask(low_res[best], size)).mean() >= 0.999

        (x2, y2), label = next_click(gt, shown)
        page.mouse.click(*screen_point(page, x2 + 0.5, y2 + 0.5), button="left" if label == 1 else "right")
        page.wait_for_function("window.sam.stats.clicks.length === 2", timeout=30_000)
        points = [tuple(p) for p in page.evaluate("window.sam.state.current.points")]
        labels = page.evaluate("window.sam.state.current.labels")
        assert len(points) == 2
        refined = np.array(page.evaluate("Array.from(window.sam.state.current.mask)"), bool).reshape(size)
        _, again = decoder(features, points, labels, size, low_res[best])
        assert (refined == decoder.mask(again[0], size)).mean() >= 0.999
        assert not errors, errors
    finally:
        started.stop()
    # The output now holds a SAM 2 session's work: a SAM 1 session on it is refused.
    with pytest.raises(RuntimeError, match="model_family: 'sam2' recorded vs 'sam'"):
        Stage(tmp_path, root / "images", tmp_path / "out", "model=vit_tiny", f"model.checkpoint={tiny_checkpoint}")


def test_review_list_hide_export_and_leases_given_back(browser, tmp_path):
    """On a dataset input (automatic masks to review): the header and the image list name
    the source files; N with an unaccepted mask warns instead of dropping it; the candidate
    buttons show predicted IoUs; H and O hide masks and change their opacity; R reviews the
    automatic masks one by one; X exports the image's masks as COCO JSON that pycocotools
    reads; a closed tab gives its image back at once; at the end of the queue the progress
    counter is current. Labels: Shift+1..9 label the selected mask and the next ones;
    the committed records and the export carry them, the dataset names them."""
    from tests.dataset_factory import make_dataset

    dataset = make_dataset(tmp_path / "ds", num_shards=1, images_per_shard=2, masks_per_image=(3, 2),
                           sizes=((96, 128), (96, 128)))
    started = Stage(tmp_path, dataset.root, tmp_path / "out", "stage.labels=[cell,debris]")
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True, accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(started.url)
        page.wait_for_function("window.sam && window.sam.state.ready", timeout=90_000)
        view = page.evaluate("window.sam.state.view")
        name = Path(view["source"]).name
        assert name in page.inner_text("#image-name")
        page.wait_for_function("document.querySelectorAll('#images li').length === 2")
        assert name in page.inner_text("#images")

        # X before any label: the masks export as "object" under an id no label has.
        with page.expect_download() as download:
            page.keyboard.press("x")
        unlabeled = json.loads(Path(download.value.path()).read_text())
        assert [a["category_id"] for a in unlabeled["annotations"]] == [3, 3, 3]
        assert unlabeled["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"},
                                           {"id": 3, "name": "object"}]

        # A click: candidates with their predicted IoU; N does not drop the unaccepted mask.
        page.mouse.click(*screen_point(page, 40.5, 40.5))
        page.wait_for_function("window.sam.state.current && window.sam.state.current.mask", timeout=30_000)
        assert re.fullmatch(r"\d · \d\.\d\d", page.inner_text("[data-candidate='1']"))
        page.keyboard.press("n")
        assert page.evaluate("window.sam.state.view.key") == view["key"]
        assert "accept (Enter) or drop (Esc)" in page.inner_text("#status")
        page.keyboard.press("Escape")

        page.keyboard.press("h")
        assert page.evaluate("window.sam.state.masksVisible") is False
        page.keyboard.press("h")
        page.keyboard.press("o")
        assert page.evaluate("window.sam.state.opacity") == 0.6

        # Labels: Shift+2 makes "debris" the next masks' label; Shift+1 on a selected mask
        # labels it "cell" and saves.
        assert "cell · Shift+1" in page.inner_text("#labels") and "debris · Shift+2" in page.inner_text("#labels")
        page.keyboard.press("Shift+Digit2")
        assert page.evaluate("window.sam.state.label") == 2
        page.keyboard.press("Tab")
        press_and_wait_saved(page, "Shift+Digit1")
        assert page.evaluate("window.sam.state.masks.map(m => m.category_id)") == [1, None, None]
        assert "cell ·" in page.inner_text("#masks")
        page.keyboard.press("Escape")

        # Review: accept the first automatic mask, delete the second, accept the third.
        automatic = page.evaluate("window.sam.state.masks.filter(m => m.provenance === 'automatic').length")
        assert automatic == 3
        page.keyboard.press("r")
        assert page.evaluate("window.sam.state.selected") == 0
        press_and_wait_saved(page, "a")
        assert page.evaluate("window.sam.state.selected") == 1  # the next automatic one, not left unseen
        press_and_wait_saved(page, "Delete")
        press_and_wait_saved(page, "a")
        page.wait_for_function("document.querySelector('#status').textContent.includes('review finished')")
        provenances = page.evaluate("window.sam.state.masks.map(m => m.provenance)")
        assert provenances == ["automatic_accepted", "automatic_accepted"]

        with page.expect_download() as download:
            page.keyboard.press("x")
        coco = json.loads(Path(download.value.path()).read_text())
        assert len(coco["annotations"]) == 2 and coco["images"][0]["file_name"] == name
        assert [a["category_id"] for a in coco["annotations"]] == [1, 1]  # the second took the label in use
        assert coco["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]
        for ann in coco["annotations"]:
            rle = mask_utils.frPyObjects(ann["segmentation"], *ann["segmentation"]["size"])
            assert mask_utils.area(rle) == ann["area"] > 0

        press_and_wait_saved(page, "m")  # done: the next image opens
        page.wait_for_function(f"window.sam.state.ready && window.sam.state.view.key !== '{view['key']}'")
        second = page.evaluate("window.sam.state.view.key")
        page.wait_for_function("document.querySelector('#images li.done, #images li.committed') !== null")
        context.close()  # the tab closes: its lease on the second image is given back

        other = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        other.goto(started.url)
        other.wait_for_function("window.sam && window.sam.state.ready", timeout=90_000)
        assert other.evaluate("window.sam.state.view.key") == second  # not "no more images" for 120 s
        for expected in (0, 1):  # Tab goes on from the mask accepted last (it started over)
            other.keyboard.press("Tab")
            assert other.evaluate("window.sam.state.selected") == expected
            press_and_wait_saved(other, "a")
        assert not other.evaluate("window.sam.state.masks.some(m => m.provenance === 'automatic')")
        press_and_wait_saved(other, "m")
        other.wait_for_function("document.querySelector('#status').textContent.includes('no more images')")
        other.wait_for_function("document.querySelector('#progress').textContent.startsWith('2 / 2 done')")
        assert not errors, errors
        first = next(s for s in iter_samples(str(tmp_path / "out")) if s.key == view["key"])
        assert [a["category_id"] for a in first.record["annotations"]] == [1, 1]
        assert [c["name"] for c in json.loads((tmp_path / "out" / "categories.json").read_text())] == ["cell", "debris"]
        other.close()  # its open connections would hold the server's graceful shutdown
    finally:
        started.stop()
