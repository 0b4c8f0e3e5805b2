// Draws the image, the masks and the current prompt on the canvas, and lists the masks;
// zoom and pan live in state.zoom (image pixels -> CSS pixels: x * s + tx).
import { bounds, colour, paint } from "/static/masks.js";

const $ = (id) => document.getElementById(id);

export class Renderer {
  constructor(state, canvas, stageEl, actions) {
    Object.assign(this, { state, canvas, stageEl, actions, frame: 0, dirty: { all: false, current: false } });
    this.overlayAll = document.createElement("canvas");
    this.overlayCurrent = document.createElement("canvas");
  }

  refresh(what = {}) {
    const dirty = this.dirty;
    dirty.all ||= !!what.all; dirty.current ||= !!what.current;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  draw() {
    this.frame = 0;
    const state = this.state, canvas = this.canvas, stageEl = this.stageEl, dirty = this.dirty;
    if (!state.image) return;
    const { H, W } = state;
    if (dirty.all) {
      const editing = state.current && state.current.source;
      const items = state.masks.map((m, i) => ({
        mask: m.mask, counts: m.counts, box: m.box, rgb: m.provenance === "automatic" ? [240, 195, 109] : colour(i),
        alpha: Math.round((i === state.selected ? 170 : m.provenance === "automatic" ? 90 : 115) * state.opacity),
      })).filter((_, i) => state.masks[i].uid !== editing && (state.masksVisible || i === state.selected));
      paint(this.overlayAll, items, H, W);
      this.listMasks();
    }
    if (dirty.current) {
      const c = state.current;
      paint(this.overlayCurrent, c && c.mask ? [{ mask: c.mask, box: bounds(c.mask, H, W), rgb: [64, 224, 255], alpha: Math.round(150 * state.opacity), edge: true }] : [], H, W);
      $("candidates").hidden = !(c && c.candidate !== null);
      document.querySelectorAll("[data-candidate]").forEach((b) => {
        const n = Number(b.dataset.candidate);
        b.classList.toggle("active", c && n === c.candidate);
        // Each candidate with the model's predicted IoU for it.
        b.textContent = c && c.result ? `${n} · ${c.result.scores[n].toFixed(2)}` : `${n}`;
      });
    }
    dirty.all = dirty.current = false;
    const dpr = window.devicePixelRatio || 1;
    const cw = stageEl.clientWidth, ch = stageEl.clientHeight;
    if (canvas.width !== cw * dpr || canvas.height !== ch * dpr) { canvas.width = cw * dpr; canvas.height = ch * dpr; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const { s, tx, ty } = state.zoom;
    ctx.setTransform(dpr * s, 0, 0, dpr * s, dpr * tx, dpr * ty);
    ctx.imageSmoothingEnabled = s < 2;
    ctx.drawImage(state.image, 0, 0);
    ctx.drawImage(this.overlayAll, 0, 0);
    ctx.drawImage(this.overlayCurrent, 0, 0);
    const c = state.current;
    if (c) {
      c.points.forEach(([x, y], i) => {
        ctx.beginPath(); ctx.arc(x, y, 5 / s, 0, 2 * Math.PI);
        ctx.fillStyle = c.labels[i] === 1 ? "#3ddc84" : "#ff5252"; ctx.fill();
        ctx.lineWidth = 1.5 / s; ctx.strokeStyle = "#000"; ctx.stroke();
      });
      if (c.box) this.drawBox(ctx, c.box, "#40e0ff");
    }
    if (state.drag && state.drag.box) this.drawBox(ctx, state.drag.box, "#ffffff");
  }

  drawBox(ctx, [x0, y0, x1, y1], colourName) {
    const state = this.state;
    ctx.lineWidth = 2 / state.zoom.s; ctx.strokeStyle = colourName;
    ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
  }

  listMasks() {
    const state = this.state, { select, remove } = this.actions;
    const list = $("masks");
    const names = new Map(((state.config && state.config.labels) || []).map((l) => [l.id, l.name]));
    list.replaceChildren(...state.masks.map((m, i) => {
      const li = document.createElement("li");
      li.classList.toggle("selected", i === state.selected);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = m.provenance === "automatic" ? "rgb(240,195,109)" : `rgb(${colour(i).join(",")})`;
      const label = document.createElement("span");
      const name = m.category_id != null ? `${names.get(m.category_id) || m.category_id} · ` : "";
      label.textContent = `${name}${m.provenance}${m.clicks ? ` · ${m.clicks} clicks` : ""}${m.strokes ? ` · ${m.strokes} strokes` : ""}`;
      if (m.provenance === "automatic") label.className = "auto";
      const del = document.createElement("button");
      del.className = "del"; del.textContent = "×"; del.title = "delete";
      del.addEventListener("click", (e) => { e.stopPropagation(); select(i); remove(); });
      li.append(swatch, label, del);
      li.addEventListener("click", () => select(i));
      return li;
    }));
    $("mask-count").textContent = `(${state.masks.length})`;
  }

  fit() {
    const state = this.state, stageEl = this.stageEl;
    const cw = stageEl.clientWidth, ch = stageEl.clientHeight;
    const s = Math.min(cw / state.W, ch / state.H) * 0.98;
    state.zoom = { s, tx: (cw - state.W * s) / 2, ty: (ch - state.H * s) / 2 };
    this.refresh();
  }

  zoomAt(factor, cx, cy) {
    const state = this.state;
    const z = state.zoom, s = Math.min(64, Math.max(0.05, z.s * factor)), f = s / z.s;
    state.zoom = { s, tx: cx - (cx - z.tx) * f, ty: cy - (cy - z.ty) * f };
    this.refresh();
  }
}
