"""Concurrency soak of the annotation tool: several simulated annotators against one
server for a bounded time, with stale tabs, lease expiries, a second server taking the
output over from a paused one, and kill -9 of the server at random moments.

    python benchmarks/annotate_soak.py --seconds 120 --annotators 4 --images 24 --seed 0

Servers are the real command (``python -m pipeline.run +stage=annotate``) on one output.
Annotators are threads speaking the HTTP API as the page does: lease an image, save a
few edits (each a mask nobody else draws), sometimes sit out their lease (a stale tab),
mark it done. Now and then the orchestrator kills the server with SIGKILL and starts a
new one, or pauses it (SIGSTOP) until its output lease expires, starts a second server
(which takes the output over), resumes the first (SIGCONT) and leaves some annotators on
it. At the end a last server and one annotator finish every image, and the result is
audited against every answer a client got:

  acknowledged  saves answered 200 (each with the version it made)
  refused       saves answered 409 (stale, taken, committed) or 503 (a server that lost the output)
  unanswered    saves whose server died before answering (not acknowledged: no promise made)
  lost          acknowledged saves whose state is not what anyone later read at that
                version, or two acknowledged saves claiming one version, or an
                acknowledged done image whose committed record differs from it
  duplicated    images in two committed records or shards

A JSON line with these counts is printed; the goal is 0 lost and 0 duplicated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.local_cluster import free_port  # noqa: E402
from pipeline.annotate.rle import counts_from_mask, mask_from_counts  # noqa: E402
from pipeline.dataset import manifest  # noqa: E402
from pipeline.dataset.listing import iter_samples  # noqa: E402

TOKEN = "soak-token-0123456789abcdef"
SIZE = (48, 64)


def content(masks: list[dict]) -> str:
    """What a state holds, comparable across save, view and commit: masks by uid and pixels."""
    items = sorted((m["uid"], hashlib.sha256(np.packbits(mask_from_counts(m["counts"], *SIZE)).tobytes()).hexdigest())
                   for m in masks)
    return json.dumps(items)


class Server:
    def __init__(self, images: Path, output: Path, lease_s: float, ttl_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "pipeline.run", "+stage=annotate", f"input={images}", f"output={output}",
                   f"stage.token={TOKEN}", f"stage.port={self.port}", f"stage.lease_s={lease_s}",
                   f"stage.output_lease_ttl_s={ttl_s}", "stage.images_per_unit=4", "stage.lookahead=0",
                   "model=vit_tiny", f"model.checkpoint={REPO / 'models' / 'sam_vit_tiny_synthetic.pth'}",
                   f"hydra.run.dir={output.parent / 'hydra' / str(self.port)}"]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONPATH": str(REPO)})

    def ready(self, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                httpx.get(self.url + "/api/progress", headers={"X-Token": TOKEN}, timeout=2).raise_for_status()
                return True
            except (httpx.HTTPError, OSError):
                time.sleep(0.3)
        return False

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()


class Ledger:
    """Every answer the clients got, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.acked: dict[tuple[str, int], list[str]] = {}   # (key, version made) -> contents acknowledged
        self.seen: dict[tuple[str, int], set[str]] = {}     # (key, version) -> contents read in views
        self.done: dict[str, tuple[int, str]] = {}          # key -> last acknowledged done save

    def view(self, view: dict) -> None:
        with self.lock:
            self.seen.setdefault((view["key"], view["version"]), set()).add(content(view["masks"]))

    def save(self, key: str, masks: list[dict], done: bool, response: httpx.Response | None) -> None:
        with self.lock:
            if response is None:
                self.counts["unanswered"] += 1
            elif response.status_code == 200:
                self.counts["acknowledged"] += 1
                version = response.json()["version"]
                self.acked.setdefault((key, version), []).append(content(masks))
                if done and (key not in self.done or self.done[key][0] < version):
                    self.done[key] = (version, content(masks))
            elif response.status_code in (409, 503):
                self.counts[f"refused_{response.status_code}"] += 1
                if response.status_code == 409 and "current" in response.json():
                    self.seen.setdefault((key, response.json()["current"]["version"]), set()).add(
                        content(response.json()["current"]["masks"]))
            else:
                self.counts[f"error_{response.status_code}"] += 1


def annotator(name: str, servers: list, ledger: Ledger, stop: threading.Event, rng: random.Random, lease_s: float):
    """Leases images, saves a few edits, sometimes idles past its lease, marks done."""
    after = None
    while not stop.is_set():
        server = servers[-1] if rng.random() > 0.2 or len(servers) < 2 else servers[-2]  # some stay on an old one
        api = httpx.Client(base_url=server.url, headers={"X-Token": TOKEN}, timeout=10)
        try:
            response = api.post("/api/lease", json={"client": name, "after": after})
            if response.status_code != 200 or response.json() is None:
                time.sleep(0.3)
                continue
            view = response.json()
            ledger.view(view)
            masks, version = list(view["masks"]), view["version"]
            for edit in range(rng.randint(1, 3)):
                if rng.random() < 0.15:
                    time.sleep(lease_s * 1.5)  # a stale tab: its lease expires meanwhile
                mask = np.zeros(SIZE, bool)
                y, x = rng.randrange(SIZE[0] - 8), rng.randrange(SIZE[1] - 8)
                mask[y:y + 8, x:x + 8] = True
                masks.append({"uid": f"{name}-{view['key']}-{version}-{edit}-{rng.random():.6f}",
                              "counts": counts_from_mask(mask), "provenance": "manual"})
                done = edit == 2 or rng.random() < 0.4
                try:
                    answer = api.put(f"/api/images/{view['key']}", json={
                        "client": name, "masks": masks, "done": done, "version": version})
                except httpx.HTTPError:
                    ledger.save(view["key"], masks, done, None)
                    break
                ledger.save(view["key"], masks, done, answer)
                if answer.status_code != 200:
                    break
                version = answer.json()["version"]
                if done:
                    break
            after = view["key"]
        except httpx.HTTPError:
            time.sleep(0.3)
        finally:
            api.close()


def finish(server, ledger: Ledger, images: int) -> None:
    """Marks every image done on the last server, re-saving what it holds."""
    api = httpx.Client(base_url=server.url, headers={"X-Token": TOKEN}, timeout=30)
    for _ in range(3 * images):
        view = api.post("/api/lease", json={"client": "finisher"}).json()
        if view is None:
            break
        ledger.view(view)
        answer = api.put(f"/api/images/{view['key']}", json={"client": "finisher", "masks": view["masks"],
                                                             "done": True, "version": view["version"]})
        ledger.save(view["key"], view["masks"], True, answer)
    api.close()


def audit(output: Path, ledger: Ledger) -> dict:
    lost = duplicated = 0
    # Two acknowledged saves that made one version: one of them was overwritten unseen.
    lost += sum(len(set(contents)) - 1 for contents in ledger.acked.values())
    # What anyone read at a version is what was acknowledged at it.
    for (key, version), contents in ledger.acked.items():
        seen = ledger.seen.get((key, version), set())
        lost += len(seen - set(contents))
    records: dict[str, list[dict]] = {}
    for sample in iter_samples(str(output), images=False):
        records.setdefault(sample.key, []).append(sample.record)
    keys = manifest.read_table(str(output)).column("key").to_pylist()
    duplicated += sum(n - 1 for n in Counter(keys).values() if n > 1)
    duplicated += sum(len(r) - 1 for r in records.values() if len(r) > 1)
    for key, (_, expected) in ledger.done.items():
        committed = records.get(key)
        if committed is not None:  # the record has no uids: compare the masks' pixels, order-free
            pixels = sorted(hashlib.sha256(np.packbits(_decode(a)).tobytes()).hexdigest()
                            for a in committed[0]["annotations"])
            lost += pixels != sorted(h for _, h in json.loads(expected))
    return {"lost": lost, "duplicated": duplicated, "committed_images": len(records), "manifest_rows": len(keys)}


def _decode(annotation: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(annotation["segmentation"]).astype(bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--ttl-s", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak_"))
    images, output = work / "images", work / "out"
    images.mkdir()
    pixels = np.random.default_rng(args.seed)
    for n in range(args.images):
        Image.fromarray(pixels.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(images / f"img_{n:03d}.png")
    ledger, stop = Ledger(), threading.Event()
    servers = [Server(images, output, args.lease_s, args.ttl_s)]
    assert servers[0].ready(), "the first server did not start"
    threads = [threading.Thread(target=annotator, args=(f"ann{i}", servers, ledger, stop, random.Random(rng.random()),
                                                        args.lease_s), daemon=True) for i in range(args.annotators)]
    for t in threads:
        t.start()
    start, events = time.monotonic(), Counter()
    while time.monotonic() - start < args.seconds:
        time.sleep(rng.uniform(3, 10))
        current = servers[-1]
        if rng.random() < 0.5:  # kill -9, then the same command again
            current.kill()
            events["kill_9"] += 1
        else:  # paused past its lease: a second server takes over, the first comes back
            current.process.send_signal(signal.SIGSTOP)
            time.sleep(args.ttl_s + 1)
            events["takeover"] += 1
        servers.append(Server(images, output, args.lease_s, args.ttl_s))
        if not servers[-1].ready():
            servers.pop()
            events["start_failed"] += 1
        current.process.send_signal(signal.SIGCONT)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    for server in servers[:-1]:
        server.kill()
    finish(servers[-1], ledger, args.images)
    servers[-1].kill()
    last = Server(images, output, args.lease_s, args.ttl_s)  # a restart commits units finished before a kill
    last.ready()
    last.kill()
    figures = {**audit(output, ledger), **ledger.counts, **events, "images": args.images,
               "seconds": round(time.monotonic() - start, 1)}
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
