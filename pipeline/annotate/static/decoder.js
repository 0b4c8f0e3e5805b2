// SAM's prompt encoder and mask decoder in the page: the ONNX graph the server exported
// (sam_core/utils/onnx.py), run by onnxruntime-web on WebAssembly, over the image
// features the server sends as float16 (SAM 1: the embedding; SAM 2: the embedding and
// two high-resolution maps). A click is answered without a round trip.
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
    this.family = model.family || "sam";
    this.imgSize = model.img_size;
    this.maskSize = model.mask_input_size;
    this.emptyMask = new ort.Tensor("float32", new Float32Array(this.maskSize * this.maskSize), [1, 1, this.maskSize, this.maskSize]);
  }

  // The features of one image: float16 bytes, arrays of `shapes` back to back -> float32
  // tensors for the graph (the embedding, then SAM 2's high-resolution maps).
  setEmbedding(buffer, shapes) {
    const half = new Uint16Array(buffer);
    let at = 0;
    this.features = shapes.map((shape) => {
      const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
      for (let i = 0; i < data.length; i++) data[i] = HALF_TO_FLOAT[half[at + i]];
      at += data.length;
      return new ort.Tensor("float32", data, shape);
    });
    if (at !== half.length) throw new Error(`features of ${half.length} values, shapes say ${at}`);
  }

  // The size of the image in the model's input frame: SAM 1 keeps the aspect ratio
  // (ResizeLongestSide's rounding, then padding); SAM 2 stretches it to the square.
  resized(height, width) {
    if (this.family === "sam2") return [this.imgSize, this.imgSize];
    const scale = this.imgSize / Math.max(height, width);
    return [Math.floor(height * scale + 0.5), Math.floor(width * scale + 0.5)];
  }

  // points: [[x, y], ...] in image pixels, labels 1/0; box: [x0, y0, x1, y1] or null;
  // previous: low-res logits (Float32Array) of the answer being refined, or null.
  // Returns {scores[4], lowRes[4] (Float32Array S x S)}; mask(lowRes[k]) makes one mask.
  async run(points, labels, box, previous, height, width) {
    const [h, w] = this.resized(height, width);
    const sx = w / width, sy = h / height;
    const coords = [], codes = [];
    const sam2 = this.family === "sam2";
    const addBox = () => { coords.push(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy); codes.push(2, 3); };
    // SAM 1: points, then the box or one padding point. SAM 2 (as its predictor): the
    // box first, then the points, then always the padding point.
    if (box && sam2) addBox();
    points.forEach(([x, y], i) => { coords.push(x * sx, y * sy); codes.push(labels[i]); });
    if (box && !sam2) addBox();
    if (!box || sam2) { coords.push(0, 0); codes.push(-1); }
    const n = codes.length, side = this.maskSize;
    const [embedding, s0, s1] = this.features;
    const feeds = {
      image_embeddings: embedding,
      ...(sam2 ? { high_res_feats_0: s0, high_res_feats_1: s1 } : {}),
      point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
      point_labels: new ort.Tensor("float32", Float32Array.from(codes), [1, n]),
      mask_input: previous ? new ort.Tensor("float32", previous, [1, 1, side, side]) : this.emptyMask,
      has_mask_input: new ort.Tensor("float32", Float32Array.of(previous ? 1 : 0), [1]),
    };
    const out = await this.session.run(feeds);
    const low = out.low_res_masks.data, plane = side * side;
    return {
      scores: Array.from(out.iou_predictions.data),
      lowRes: [0, 1, 2, 3].map((k) => low.slice(k * plane, (k + 1) * plane)),
    };
  }

  // One low-res mask -> the image-size mask (Uint8Array, 1 = object): exactly
  // Sam.postprocess_masks (bilinear to the square input frame, crop the padding,
  // bilinear to the image size) and > 0; SAM 2: bilinear straight to the image size. The
  // graph leaves this to the page so that only the mask shown is upsampled, not all four.
  mask(lowRes, height, width) {
    const side = this.maskSize;
    if (this.family === "sam2") return resize(lowRes, side, side, height, width, height, width, true);
    const [h, w] = this.resized(height, width);
    const frame = resize(lowRes, side, side, this.imgSize, this.imgSize, h, w);
    return h === height && w === width ? threshold(frame) : resize(frame, h, w, height, width, height, width, true);
  }
}

// Bilinear resize with PyTorch's align_corners=False of an inH x inW plane to outH x outW,
// keeping only the top-left cropH x cropW of the result; with `binary`, thresholded at 0
// into a Uint8Array in the same pass. Separable: the source rows are resized along x
// once, then blended along y.
export function resize(src, inH, inW, outH, outW, cropH, cropW, binary = false) {
  const axis = (inSize, outSize, count) => {
    const i0 = new Int32Array(count), i1 = new Int32Array(count), f = new Float32Array(count);
    const scale = inSize / outSize;
    for (let o = 0; o < count; o++) {
      const at = Math.max(scale * (o + 0.5) - 0.5, 0);
      const lo = Math.floor(at);
      i0[o] = lo; i1[o] = lo < inSize - 1 ? lo + 1 : lo; f[o] = at - lo;
    }
    return { i0, i1, f };
  };
  const X = axis(inW, outW, cropW), Y = axis(inH, outH, cropH);
  const rowsUsed = Math.min(inH, Y.i1[cropH - 1] + 1);
  const rows = new Float32Array(rowsUsed * cropW);
  for (let r = 0; r < rowsUsed; r++) {
    const base = r * inW, at = r * cropW;
    for (let x = 0; x < cropW; x++) {
      const a = src[base + X.i0[x]];
      rows[at + x] = a + (src[base + X.i1[x]] - a) * X.f[x];
    }
  }
  const out = binary ? new Uint8Array(cropH * cropW) : new Float32Array(cropH * cropW);
  for (let y = 0; y < cropH; y++) {
    const top = Y.i0[y] * cropW, bottom = Y.i1[y] * cropW, f = Y.f[y], base = y * cropW;
    if (binary) {
      for (let x = 0; x < cropW; x++) {
        const a = rows[top + x];
        out[base + x] = a + (rows[bottom + x] - a) * f > 0 ? 1 : 0;
      }
    } else {
      for (let x = 0; x < cropW; x++) {
        const a = rows[top + x];
        out[base + x] = a + (rows[bottom + x] - a) * f;
      }
    }
  }
  return out;
}

function threshold(logits) {
  const out = new Uint8Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i] > 0 ? 1 : 0;
  return out;
}
