// Masks in the page: row-major Uint8Array (1 = object) of the image size, exchanged with
// the server as uncompressed column-major RLE counts (zeros first, COCO's order). Masks
// from the server stay as counts until someone edits them: a 1500 x 2000 image with a
// hundred automatic masks would otherwise hold 300 MB of bitmaps.

export function decodeCounts(counts, height, width) {
  const mask = new Uint8Array(height * width);
  let p = 0, value = 0;
  for (const run of counts) {
    if (value) {
      for (let i = p; i < p + run; i++) {
        const x = (i / height) | 0, y = i - x * height; // column-major position
        mask[y * width + x] = 1;
      }
    }
    p += run; value ^= 1;
  }
  return mask;
}

export function encodeCounts(mask, height, width) {
  const counts = [];
  let value = 0, run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const v = mask[y * width + x];
      if (v !== value) { counts.push(run); run = 0; value = v; }
      run++;
    }
  }
  counts.push(run);
  return counts;
}

// The same from the counts alone, without decoding the mask.
export function countsBounds(counts, height) {
  let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1, p = 0;
  for (let r = 0; r < counts.length; r++) {
    const run = counts[r];
    if (r % 2 === 1 && run > 0) {
      const first = p, last = p + run - 1;
      const cx0 = (first / height) | 0, cx1 = (last / height) | 0;
      x0 = Math.min(x0, cx0); x1 = Math.max(x1, cx1);
      if (cx0 === cx1) { y0 = Math.min(y0, first - cx0 * height); y1 = Math.max(y1, last - cx1 * height); }
      else { y0 = 0; y1 = height - 1; }
    }
    p += run;
  }
  return x1 < 0 ? null : [x0, y0, x1 + 1, y1 + 1];
}

// Whether pixel (x, y) is set, from the counts (binary search over their prefix sums).
export function countsHas(prefix, height, x, y) {
  const i = x * height + y;
  let lo = 0, hi = prefix.length - 1; // prefix[r] = pixels before run r
  while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (prefix[mid] <= i) lo = mid; else hi = mid - 1; }
  return lo % 2 === 1;
}

export function prefixSums(counts) {
  const prefix = new Float64Array(counts.length);
  for (let r = 1; r < counts.length; r++) prefix[r] = prefix[r - 1] + counts[r - 1];
  return prefix;
}

// [x0, y0, x1, y1] (exclusive) of the set pixels, or null for an empty mask.
export function bounds(mask, height, width) {
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    const base = y * width;
    for (let x = 0; x < width; x++) {
      if (mask[base + x]) { if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; y1 = y; }
    }
  }
  return x1 < 0 ? null : [x0, y0, x1 + 1, y1 + 1];
}

// A distinct colour per mask (golden-angle hues), [r, g, b].
export function colour(index) {
  const hue = (index * 137.508) % 360, s = 0.75, l = 0.55;
  const k = (n) => (n + hue / 30) % 12, a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
  return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
}

// Paints masks into an RGBA canvas of the image size: each mask's pixels in its colour
// at `alpha`, within its bounds only (large images with many masks stay fast); with
// `edge`, its boundary pixels opaque white, so the selected mask stands out.
export function paint(canvas, items, height, width) {
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  // Only the union of the masks' boxes is written: one small mask on a large image
  // costs its box, not the image.
  const boxes = items.map((item) => item.box).filter(Boolean);
  if (!boxes.length) return;
  const X0 = Math.min(...boxes.map((b) => b[0])), Y0 = Math.min(...boxes.map((b) => b[1]));
  const bw = Math.max(...boxes.map((b) => b[2])) - X0, bh = Math.max(...boxes.map((b) => b[3])) - Y0;
  const image = ctx.createImageData(bw, bh);
  const px = new Uint32Array(image.data.buffer);
  const white = 0xffffffff;
  for (const { mask, counts, rgb, alpha, box, edge } of items) {
    if (!box) continue;
    const value = ((alpha & 255) << 24) | (rgb[2] << 16) | (rgb[1] << 8) | rgb[0]; // little-endian RGBA
    if (!mask) { // straight from the runs: masks nobody edits are never decoded
      let p = 0;
      for (let r = 0; r < counts.length; r++) {
        if (r % 2 === 1) {
          for (let i = p; i < p + counts[r]; i++) {
            const x = (i / height) | 0, y = i - x * height;
            px[(y - Y0) * bw + x - X0] = value;
          }
        }
        p += counts[r];
      }
      continue;
    }
    for (let y = box[1]; y < box[3]; y++) {
      const base = y * width, row = (y - Y0) * bw - X0;
      for (let x = box[0]; x < box[2]; x++) {
        const i = base + x;
        if (!mask[i]) continue;
        const boundary = edge && (x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
          !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width]);
        px[row + x] = boundary ? white : value;
      }
    }
  }
  ctx.putImageData(image, X0, Y0);
}

// Sets (value 1) or clears (0) a disc of radius r around (cx, cy); returns the box touched.
export function stamp(mask, height, width, cx, cy, r, value) {
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(width, Math.ceil(cx + r) + 1);
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(height, Math.ceil(cy + r) + 1);
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      if (dx * dx + dy * dy <= r * r) mask[y * width + x] = value;
    }
  }
  return [x0, y0, x1, y1];
}
