// SAM's prompt encoder and mask decoder in the page: the ONNX graph the server exported
// (sam_core/onnx.py), run by onnxruntime-web on WebAssembly, over the image embedding the
// server sends as float16. A click is answered without a round trip.
import * as ort from "/static/vendor/onnxruntime-web/ort.wasm.min.mjs";

// Its Emscripten glue (ort-wasm-simd-threaded.mjs) and .wasm, from the app's own files.
ort.env.wasm.wasmPaths = "/static/vendor/onnxruntime-web/";

// float16 -> float32 for every bit pattern, built once.
const HALF_TO_FLOAT = (() => {
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) table[h] = sign * 2 ** -14 * (fraction / 1024);
    else if (exponent === 31) table[h] = fraction ? NaN : sign * Infinity;
    else table[h] = sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }
  return table;
})();

export class Decoder {
  static async load(model, threads, headers) {
    // 0: onnxruntime-web's own choice (half the cores, at most 4; threads need the
    // cross-origin isolation the server's headers give).
    if (threads > 0) ort.env.wasm.numThreads = threads;
    const bytes = await (await fetch(model.decoder_url, { headers })).arrayBuffer();
    const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    return new Decoder(session, model);
  }

  constructor(session, model) {
    this.session = session;
    this.imgSize = model.img_size;
    this.maskSize = model.mask_input_size;
    this.emptyMask = new ort.Tensor("float32", new Float32Array(this.maskSize * this.maskSize), [1, 1, this.maskSize, this.maskSize]);
  }

  // The embedding of one image: float16 bytes -> a float32 tensor for the graph.
  setEmbedding(buffer, shape) {
    const half = new Uint16Array(buffer);
    const data = new Float32Array(half.length);
    for (let i = 0; i < half.length; i++) data[i] = HALF_TO_FLOAT[half[i]];
    this.embedding = new ort.Tensor("float32", data, shape);
  }

  // The size of the image in the model's input frame (ResizeLongestSide's rounding).
  resized(height, width) {
    const scale = this.imgSize / Math.max(height, width);
    return [Math.floor(height * scale + 0.5), Math.floor(width * scale + 0.5)];
  }

  // points: [[x, y], ...] in image pixels, labels 1/0; box: [x0, y0, x1, y1] or null;
  // previous: low-res logits (Float32Array) of the answer being refined, or null.
  // Returns {scores[4], lowRes[4] (Float32Array), logits(k) -> the k-th mask's logits in
  // the input frame, frame: [h, w]}.
  async run(points, labels, box, previous, height, width) {
    const [h, w] = this.resized(height, width);
    const sx = w / width, sy = h / height;
    const coords = [], codes = [];
    points.forEach(([x, y], i) => { coords.push(x * sx, y * sy); codes.push(labels[i]); });
    if (box) { coords.push(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy); codes.push(2, 3); }
    else { coords.push(0, 0); codes.push(-1); }
    const n = codes.length, side = this.maskSize;
    const feeds = {
      image_embeddings: this.embedding,
      point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
      point_labels: new ort.Tensor("float32", Float32Array.from(codes), [1, n]),
      mask_input: previous ? new ort.Tensor("float32", previous, [1, 1, side, side]) : this.emptyMask,
      has_mask_input: new ort.Tensor("float32", Float32Array.of(previous ? 1 : 0), [1]),
      // The graph's masks in the input frame (its last resize is then the identity); the
      // page upsamples only the one mask it shows (upsample below), not all four.
      orig_im_size: new ort.Tensor("float32", Float32Array.of(h, w), [2]),
    };
    const out = await this.session.run(feeds);
    const masks = out.masks.data, low = out.low_res_masks.data, plane = h * w, lowPlane = side * side;
    return {
      scores: Array.from(out.iou_predictions.data),
      lowRes: [0, 1, 2, 3].map((k) => low.slice(k * lowPlane, (k + 1) * lowPlane)),
      logits: (k) => masks.subarray(k * plane, (k + 1) * plane),
      frame: [h, w],
    };
  }
}

// Bilinear resize (PyTorch's align_corners=False) of h x w logits to height x width,
// thresholded at 0: exactly Sam.postprocess_masks' last step, for one mask. Separable:
// each source row is resized along x once, then rows are blended.
export function upsample(logits, h, w, height, width) {
  const out = new Uint8Array(height * width);
  if (h === height && w === width) {
    for (let i = 0; i < out.length; i++) out[i] = logits[i] > 0 ? 1 : 0;
    return out;
  }
  const axis = (inSize, outSize) => {
    const i0 = new Int32Array(outSize), i1 = new Int32Array(outSize), f = new Float32Array(outSize);
    const scale = inSize / outSize;
    for (let o = 0; o < outSize; o++) {
      const src = Math.max(scale * (o + 0.5) - 0.5, 0);
      const lo = Math.floor(src);
      i0[o] = lo; i1[o] = lo < inSize - 1 ? lo + 1 : lo; f[o] = src - lo;
    }
    return { i0, i1, f };
  };
  const X = axis(w, width), Y = axis(h, height);
  const rows = new Map();
  const row = (r) => {
    let v = rows.get(r);
    if (!v) {
      v = new Float32Array(width);
      const base = r * w;
      for (let x = 0; x < width; x++) {
        const a = logits[base + X.i0[x]], b = logits[base + X.i1[x]];
        v[x] = a + (b - a) * X.f[x];
      }
      rows.set(r, v);
    }
    return v;
  };
  for (let y = 0; y < height; y++) {
    const top = row(Y.i0[y]), bottom = row(Y.i1[y]), f = Y.f[y], base = y * width;
    for (let x = 0; x < width; x++) {
      const v = top[x] + (bottom[x] - top[x]) * f;
      out[base + x] = v > 0 ? 1 : 0;
    }
  }
  return out;
}
