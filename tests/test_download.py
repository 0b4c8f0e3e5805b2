"""Official checkpoints fetched on first use (pipeline/models/download.py), from a real
HTTP server on the loopback interface: resumed after a dropped connection, checked
against the published sha256, refused on a mismatch, and a clear error offline."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from omegaconf import OmegaConf

from pipeline.dataset import manifest
from pipeline.models.download import CACHE_ENV, DownloadError, ensure_checkpoint
from pipeline.stages import run_stage
from tests.conftest import REPO


class Files(BaseHTTPRequestHandler):
    """Serves ``files`` with HTTP Range support; ``cut`` drops the connection of the
    first full request after that many bytes (a network failure mid-download)."""

    files: dict[str, bytes] = {}
    cut: int | None = None
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the handler API's name)
        name = self.path.lstrip("/")
        if name not in self.files:
            self.send_error(404)
            return
        data = self.files[name]
        first = 0
        if self.headers.get("Range"):
            first = int(self.headers["Range"].split("=")[1].split("-")[0])
        type(self).requests.append(self.headers.get("Range") or "full")
        if first >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        body = data[first:]
        self.send_response(206 if first else 200)
        self.send_header("Content-Length", str(len(body)))
        if first:
            self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if type(self).cut is not None and not first:
            self.wfile.write(body[: type(self).cut])
            type(self).cut = None
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tiny_checkpoint):
    Files.files = {"sam_vit_tiny_official.pth": tiny_checkpoint.read_bytes()}
    Files.cut, Files.requests = None, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _model(tmp_path, url: str, sha256: str | None, name: str = "sam_vit_tiny_official.pth"):
    return OmegaConf.create({"arch": "vit_tiny", "checkpoint": str(tmp_path / "models" / name), "device": "cpu",
                             "download": {"url": url, "sha256": sha256}})


def test_a_dropped_download_resumes_and_the_run_uses_the_verified_file(
        server, tiny_checkpoint, tmp_path, monkeypatch, compose_config, ray_local):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    sha = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    url = f"{server}/sam_vit_tiny_official.pth"
    Files.cut = 100_000
    with pytest.raises(DownloadError, match=r"100,000 bytes received .* resumes"):
        ensure_checkpoint(_model(tmp_path, url, sha))
    assert not (tmp_path / "cache" / "sam_vit_tiny_official.pth").exists()  # nothing committed half-way

    # The same command again: the stage fetches the rest (a Range request) and runs on it.
    out = tmp_path / "out"
    missing = tmp_path / "models" / "sam_vit_tiny_official.pth"
    cfg = compose_config("+stage=fully_auto", f"input={REPO / 'sample' / 'images' / 'coffee.jpg'}",
                         f"output={out}", "model=vit_tiny", f"model.checkpoint={missing}",
                         f"+model.download.url={url}", f"+model.download.sha256={sha}",
                         "amg.points_per_side=4", "stage.image.short_side=96")
    summary = run_stage(cfg)
    assert summary["images_ok"] == 1
    assert Files.requests == ["full", "bytes=100000-"]
    cached = tmp_path / "cache" / "sam_vit_tiny_official.pth"
    assert cached.read_bytes() == tiny_checkpoint.read_bytes()
    assert manifest.read_table(str(out)).column("model_sha256").to_pylist() == [sha]
    # Cached: the next run does not download again.
    ensure_checkpoint(_model(tmp_path, url, sha))
    assert len(Files.requests) == 2


def test_bytes_that_are_not_the_published_ones_are_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = _model(tmp_path, f"{server}/sam_vit_tiny_official.pth", "0" * 64)
    with pytest.raises(DownloadError, match="published one is 0000.*refused"):
        ensure_checkpoint(model)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing kept, not even the partial file
    assert model.checkpoint.endswith("models/sam_vit_tiny_official.pth")


def test_offline_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/sam_vit_tiny_official.pth"  # the discard port: nothing listens
    with pytest.raises(DownloadError) as err:
        ensure_checkpoint(_model(tmp_path, url, None))
    assert url in str(err.value) and str(tmp_path / "cache" / "sam_vit_tiny_official.pth") in str(err.value)


def test_another_file_name_is_never_replaced_by_the_download(server, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = _model(tmp_path, f"{server}/sam_vit_tiny_official.pth", None, name="my_own_model.pth")
    ensure_checkpoint(model)
    assert model.checkpoint == str(tmp_path / "models" / "my_own_model.pth") and Files.requests == []


def test_official_model_configs_name_their_download(compose_config):
    for name in ("vit_b", "vit_l", "vit_h", "sam2.1_hiera_t", "sam2.1_hiera_l", "sam2_hiera_s"):
        cfg = compose_config("+stage=fully_auto", "output=/x", f"model={name}")
        url = cfg.model.download.url
        assert url.startswith("https://dl.fbaipublicfiles.com/")
        assert url.endswith(cfg.model.checkpoint.rsplit("/", 1)[1])
        if not name.startswith("sam2_"):  # SAM 2.0: no published hash known here
            assert len(cfg.model.download.sha256) == 64
