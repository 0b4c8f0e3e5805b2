"""The server's model: image embeddings computed with ``sam_core`` (on the GPU when there
is one), cached, and computed ahead for the next images of the queue; and the decoder
exported to ONNX for the browser, once per model.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

import sam_core
from pipeline.inputs.images import PreparedImage
from pipeline.models.loader import RANDOM_WEIGHTS
from sam_core.utils.onnx import export

log = logging.getLogger(__name__)


class ImageModel:
    """Embeds images for the browser's decoder.

    ``embedding(key)`` blocks until the key's features are ready: float16 arrays, the
    image embedding (1 x C x h x w) and, for SAM 2, its two high-resolution maps;
    ``prefetch(keys)`` queues keys in the background. The ``cache_size`` most recently
    used embeddings stay in memory. One worker thread runs the encoder, so requests and
    look-ahead never compete for the device.
    """

    def __init__(
        self, sam: sam_core.modeling.Sam, load: Callable[[str], PreparedImage], cache_size: int = 16
    ) -> None:
        self.sam = sam
        self.predictor = sam_core.SamPredictor(sam)
        self.load = load
        self.cache_size = max(1, cache_size)
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="encoder")

    @property
    def feature_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of what ``embedding`` returns, in order."""
        return feature_shapes(self.sam)

    def _future(self, key: str) -> Future:
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._futures[key] = self._pool.submit(self._compute, key)
            self._futures.move_to_end(key)
            while len(self._futures) > self.cache_size:
                _, old = self._futures.popitem(last=False)
                old.cancel()
            return future

    def embedding(self, key: str) -> list[np.ndarray]:
        return self._future(key).result()

    def prefetch(self, keys: list[str]) -> None:
        for key in keys[: self.cache_size - 1]:
            self._future(key)

    def _compute(self, key: str) -> list[np.ndarray]:
        image = self.load(key)
        self.predictor.set_image(image.rgb)
        features = [self.predictor.get_image_embedding(), *(self.predictor.get_high_res_features() or [])]
        self.predictor.reset_image()
        return [f.float().cpu().numpy().astype(np.float16) for f in features]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def feature_shapes(sam: sam_core.modeling.Sam) -> list[tuple[int, ...]]:
    """What the page's decoder takes per image: the embedding's shape, then (SAM 2) those
    of its high-resolution maps (32 x 4h x 4w, 64 x 2h x 2w)."""
    h, w = sam.prompt_encoder.image_embedding_size
    shapes: list[tuple[int, ...]] = [(1, sam.prompt_encoder.embed_dim, h, w)]
    if sam.family == "sam2":
        decoder = sam.mask_decoder
        shapes += [(1, decoder.conv_s0.out_channels, 4 * h, 4 * w), (1, decoder.conv_s1.out_channels, 2 * h, 2 * w)]
    return shapes


def exported_decoder(sam: sam_core.modeling.Sam, arch: str, identity: str, cache_dir: str) -> str:
    """The ONNX decoder of ``sam`` for the page, in ``cache_dir``: the low-res graph (the
    page upsamples the one mask it shows), exported once per (arch, checkpoint sha256)
    and written atomically; random weights are exported on every call."""
    os.makedirs(cache_dir, exist_ok=True)
    name = (f"{arch}-{identity[:16]}-lowres.onnx" if identity != RANDOM_WEIGHTS
            else f"{arch}-random-{os.getpid()}-lowres.onnx")
    path = os.path.join(cache_dir, name)
    if identity != RANDOM_WEIGHTS and os.path.isfile(path):
        return path
    temp = os.path.join(cache_dir, f".{name}.tmp-{uuid.uuid4().hex}")
    log.info("exporting the %s decoder to ONNX for the browser: %s", arch, path)
    cpu = next(sam.parameters()).device.type == "cpu"
    try:
        # The export traces on the CPU; a copy keeps the GPU model where it is.
        export(sam if cpu else _cpu_copy(sam, arch), temp, upscale=False)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def _cpu_copy(sam: sam_core.modeling.Sam, arch: str) -> sam_core.modeling.Sam:
    extra = {"image_size": sam.img_size} if sam.family == "sam2" else {}
    copy = sam_core.sam_model_registry[arch](**extra)
    copy.load_state_dict({k: v.cpu() for k, v in sam.state_dict().items()})
    return copy.eval()
