// The annotation tool: one image at a time from the server's queue; clicks and boxes
// answered by the decoder in the page; masks accepted, corrected with a brush, saved to
// the server on every change.
import { Decoder } from "/static/decoder.js";
import { bounds, countsBounds, countsHas, decodeCounts, encodeCounts, prefixSums, stamp } from "/static/masks.js";
import { Renderer } from "/static/render.js";

const $ = (id) => document.getElementById(id);
const canvas = $("view"), stageEl = $("stage");

const state = {
  config: null, decoder: null, view: null, image: null, H: 0, W: 0,
  client: sessionStorage.getItem("sam-client") || `browser-${crypto.randomUUID().slice(0, 12)}`,
  masks: [],        // {uid, mask, box, provenance, clicks, strokes, seconds, annotator, point_coords, category_id, counts}
  selected: null,   // index into masks
  cursor: null,     // the mask selected last: Tab goes on from it after an accept or a delete
  current: null,    // the mask being made or edited (see newCurrent)
  tool: "click", brush: 12, undo: [], redo: [],
  masksVisible: true, opacity: 1, reviewing: false,
  label: null,      // the label new masks get (a category id of config.labels), null when class-free
  zoom: { s: 1, tx: 0, ty: 0 }, space: false, drag: null,
  decoding: false, again: false, saving: Promise.resolve(), ready: false,
};
sessionStorage.setItem("sam-client", state.client);
// Read by the browser tests and the latency benchmark.
const stats = { clicks: [] };
window.sam = { state, stats };

function status(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) {
    const detail = await response.text();
    let parsed = null;
    try { parsed = JSON.parse(detail); } catch (_) { /* plain text */ }
    const error = new Error(`${response.status}: ${parsed && parsed.detail ? parsed.detail : detail}`);
    error.status = response.status;
    error.body = parsed;
    throw error;
  }
  return response;
}

// --- the document: masks, the current edit, undo ---------------------------------------
// The bitmap of a mask, decoded from its counts the first time it is needed.
function bitmap(m) {
  if (!m.mask) m.mask = decodeCounts(m.counts, state.H, state.W);
  return m.mask;
}

function newCurrent(source = null) {
  const base = source === null ? null : state.masks[source];
  if (base) bitmap(base);
  return {
    source: base ? base.uid : null, points: [], labels: [], box: null,
    mask: base ? base.mask : null, lowRes: null, result: null, candidate: null,
    clicks: 0, strokes: 0, started: performance.now(), prompted: false, edited: false,
  };
}

function snapshot() {
  const c = state.current;
  return {
    masks: state.masks.slice(), selected: state.selected,
    current: c && { ...c, points: c.points.slice(), labels: c.labels.slice() },
  };
}

function remember() {
  state.undo.push(snapshot());
  if (state.undo.length > 200) state.undo.shift();
  state.redo = [];
}

function restore(from, to) {
  const snap = from.pop();
  if (!snap) return;
  to.push(snapshot());
  const savedBefore = snap.masks !== state.masks;
  Object.assign(state, { masks: snap.masks, selected: snap.selected, current: snap.current });
  refresh({ all: true, current: true });
  if (savedBefore) save();
}

function maskObject(fields) {
  if (fields.mask) return { ...fields, counts: null, box: bounds(fields.mask, state.H, state.W) };
  return { ...fields, mask: null, box: countsBounds(fields.counts, state.H) };
}

// An automatic mask accepted as it is: by this annotator, with the label in use if it has none.
function accepted(m) {
  return { ...m, provenance: "automatic_accepted", annotator: annotator(), category_id: m.category_id ?? state.label };
}

function accept() {
  const c = state.current;
  if (!c) {
    // Accepting a selected automatic mask as it is.
    const m = state.masks[state.selected];
    if (m && m.provenance === "automatic") {
      remember();
      state.masks = state.masks.map((x, i) => (i === state.selected ? accepted(x) : x));
      state.selected = null;
      refresh({ all: true }); save();
      reviewNext();
    }
    return;
  }
  if (!c.mask || !bounds(c.mask, state.H, state.W)) { status("nothing to accept: the mask is empty"); return; }
  remember();
  const index = c.source === null ? -1 : state.masks.findIndex((m) => m.uid === c.source);
  const old = index >= 0 ? state.masks[index] : null;
  let provenance;
  if (!old) provenance = c.prompted ? "model_assisted" : "manual";
  else if (old.provenance === "automatic") provenance = c.prompted || c.edited ? "automatic_edited" : "automatic_accepted";
  else provenance = old.provenance === "manual" && c.prompted ? "model_assisted" : old.provenance;
  const positives = c.points.filter((_, i) => c.labels[i] === 1);
  const mask = maskObject({
    uid: old ? old.uid : crypto.randomUUID(), mask: c.mask, provenance,
    clicks: (old ? old.clicks : 0) + c.clicks,
    strokes: (old ? old.strokes || 0 : 0) + c.strokes,
    seconds: (old ? old.seconds : 0) + (performance.now() - c.started) / 1000,
    annotator: annotator(), point_coords: [...(old ? old.point_coords : []), ...positives],
    category_id: old && old.category_id != null ? old.category_id : state.label,
  });
  state.masks = index >= 0 ? state.masks.map((m, i) => (i === index ? mask : m)) : [...state.masks, mask];
  state.current = null; state.selected = null;
  refresh({ all: true, current: true });
  save();
  if (old && old.provenance === "automatic") reviewNext();
}

// Review mode: the automatic masks one by one; accepting, fixing or deleting one selects
// the next, so none is accepted unseen.
function review() {
  state.reviewing = true;
  reviewNext();
}

function reviewNext() {
  if (!state.reviewing) return;
  const next = state.masks.findIndex((m) => m.provenance === "automatic");
  // Shown once the save of the last decision is answered (its "saved" would hide it).
  const say = (text) => state.saving.then((saved) => { if (saved !== false) status(text); });
  if (next < 0) {
    state.reviewing = false;
    say("review finished: every automatic mask was accepted, fixed or deleted");
    select(null);
    return;
  }
  select(next);
  const left = state.masks.filter((m) => m.provenance === "automatic").length;
  say(`review: automatic mask ${next + 1}; ${left} left (A accept, click or brush to fix, Del delete)`);
}

function acceptAllAutomatic() {
  if (!state.masks.some((m) => m.provenance === "automatic")) return;
  remember();
  state.masks = state.masks.map((m) => (m.provenance === "automatic" ? accepted(m) : m));
  refresh({ all: true }); save();
}

function remove() {
  const c = state.current;
  if (c && c.source === null) { remember(); state.current = null; refresh({ current: true }); return; }
  if (state.selected === null) return;
  remember();
  const wasAutomatic = state.masks[state.selected].provenance === "automatic";
  state.masks = state.masks.filter((_, i) => i !== state.selected);
  state.cursor = state.selected - 1;  // Tab: the mask that took the deleted one's place
  state.selected = null; state.current = null;
  refresh({ all: true, current: true });
  save();
  if (wasAutomatic) reviewNext();
}

function select(index) {
  if (index === null || index < 0 || index >= state.masks.length) { state.selected = null; state.current = null; }
  else { state.selected = index; state.cursor = index; state.current = newCurrent(index); }
  refresh({ all: true, current: true });
}

function annotator() { return $("annotator").value.trim() || state.config.annotator; }

// --- prompts ---------------------------------------------------------------------------
function addPoint(x, y, label, t0) {
  remember();
  if (!state.current) state.current = newCurrent(state.selected);
  const c = state.current;
  c.points.push([x, y]); c.labels.push(label); c.clicks += 1;
  decode(t0);
}

function setBox(box, t0) {
  remember();
  if (!state.current) state.current = newCurrent(state.selected);
  state.current.box = box; state.current.clicks += 2;
  decode(t0);
}

// Runs the decoder on the current prompt; clicks that arrive meanwhile are answered by
// one more run with all of them.
async function decode(t0) {
  if (state.decoding) { state.again = true; return; }
  state.decoding = true;
  try {
    do {
      state.again = false;
      const c = state.current;
      if (!c || (!c.points.length && !c.box)) break;
      // One click: the three ambiguity-aware masks, the best first; otherwise the
      // single-mask output refined from the previous answer's logits.
      const multimask = c.points.length === 1 && !c.box;
      const runStart = performance.now();
      const res = await state.decoder.run(c.points, c.labels, c.box, multimask ? null : c.lowRes, state.H, state.W);
      const runEnd = performance.now();
      if (state.current !== c) break;
      const k = multimask ? [2, 3].reduce((best, i) => (res.scores[i] > res.scores[best] ? i : best), 1) : 0;
      useCandidate(c, res, k, multimask);
      const ready = performance.now();
      if (t0 !== undefined) {
        const start = t0, points = c.points.length + (c.box ? 2 : 0);
        const phases = { before_ms: runStart - start, run_ms: runEnd - runStart, upsample_ms: ready - runEnd };
        // Painted: after the frame that shows the mask has been drawn.
        requestAnimationFrame(() => setTimeout(() => {
          stats.clicks.push({ mask_ms: ready - start, painted_ms: performance.now() - start, points, ...phases });
        }, 0));
        t0 = undefined;
      }
      status(`mask in ${(ready - (stats.lastT0 || ready)).toFixed(0)} ms · IoU ${res.scores[k].toFixed(2)}`);
    } while (state.again);
  } catch (e) {
    status(`decoder failed: ${e.message}`, true);
    console.error(e);
  } finally {
    state.decoding = false;
  }
}

function useCandidate(c, res, k, multimask) {
  c.result = res; c.candidate = multimask ? k : null; c.lowRes = res.lowRes[k];
  c.mask = state.decoder.mask(res.lowRes[k], state.H, state.W);
  c.prompted = true;
  refresh({ current: true });
}

function pickCandidate(n) {
  const c = state.current;
  if (!c || c.candidate === null || !c.result) return;
  remember();
  useCandidate(c, c.result, n, true);
}

// --- brush -------------------------------------------------------------------------------
function strokeStart(x, y, value) {
  remember();
  if (!state.current) state.current = newCurrent(state.selected);
  const c = state.current;
  // Copy on write: undo keeps the mask as it was before the stroke.
  c.mask = c.mask ? c.mask.slice() : new Uint8Array(state.H * state.W);
  c.edited = true;
  c.strokes += 1;
  strokeTo(x, y, value);
}

function strokeTo(x, y, value) {
  const c = state.current;
  const r = state.brush / 2;
  const last = state.drag.last || [x, y];
  const steps = Math.max(1, Math.ceil(Math.hypot(x - last[0], y - last[1]) / Math.max(1, r / 2)));
  for (let i = 1; i <= steps; i++) {
    stamp(c.mask, state.H, state.W, last[0] + ((x - last[0]) * i) / steps, last[1] + ((y - last[1]) * i) / steps, r, value);
  }
  state.drag.last = [x, y];
  refresh({ current: true });
}

// --- saving and the queue ----------------------------------------------------------------
function save(done = false) {
  const view = state.view;
  if (!view || !view.editable) return Promise.resolve(false);
  const body = {
    client: state.client, done,
    masks: state.masks.map((m) => {
      if (!m.counts) m.counts = encodeCounts(m.mask, state.H, state.W);
      return { uid: m.uid, counts: m.counts, provenance: m.provenance, clicks: m.clicks, strokes: m.strokes || 0,
               seconds: Math.round(m.seconds * 1000) / 1000, annotator: m.annotator || "", point_coords: m.point_coords || [],
               category_id: m.category_id ?? null };
    }),
  };
  state.saving = state.saving.then(async () => {
    if (!view.editable) return false;
    // The version is read when the save is sent: a save queued behind another edits its result.
    body.version = view.version;
    try {
      const result = await (await api("PUT", `/api/images/${view.key}`, body)).json();
      view.version = result.version;
      status(done ? (result.committed ? "done; unit committed" : "done") : `saved ${body.masks.length} mask(s)`);
      return true;
    } catch (e) {
      view.editable = false;
      if (e.status === 503) {
        state.lost = true;
        status(`NOT SAVED: ${e.message}. Ask whoever runs the tool which server to use now.`, true);
      } else if (e.status === 409 && e.body && e.body.current) {
        await show(e.body.current);
        status("NOT SAVED: someone else saved this image since you opened it; showing their version", true);
      } else {
        status(e.status === 409 ? `NOT SAVED: ${e.message}` : `not saved: ${e.message}`, true);
      }
      return false;
    }
  });
  return state.saving;
}

async function open(step, key) {
  await state.saving; // the last save of this image lands before its lease moves on
  const after = state.view ? state.view.key : null;
  status("loading…");
  let view;
  try {
    view = await (await api("POST", "/api/lease", { client: state.client, after, step, key })).json();
  } catch (e) { status(`cannot open: ${e.message}`, true); return; }
  if (!view) { status(step > 0 ? "no more images to annotate" : "no previous image"); updateProgress(); refreshImages(); return; }
  await show(view);
}

// N, P and the arrows leave the image: an unaccepted mask is not dropped silently.
function leave(step) {
  const c = state.current;
  if (c && (c.prompted || c.edited)) { status("accept (Enter) or drop (Esc) the current mask first", true); return; }
  open(step);
}

async function show(view) {
  state.ready = false;
  const image = new Image();
  image.src = `/api/images/${view.key}/image.jpg`;
  const embedding = fetch(`/api/images/${view.key}/embedding`);
  await image.decode();
  const response = await embedding;
  if (!response.ok) { status(`no embedding for ${view.key}: ${await response.text()}`, true); return; }
  const shapes = response.headers.get("X-Feature-Shapes").split(";").map((s) => s.split(",").map(Number));
  state.decoder.setEmbedding(await response.arrayBuffer(), shapes);
  Object.assign(state, { view, image, H: view.height, W: view.width, selected: null, current: null, undo: [], redo: [] });
  state.masks = view.masks.map((m) => maskObject({ ...m }));
  state.cursor = null;
  const name = view.source.split("/").pop();
  $("image-name").textContent = `${name} · ${view.key} (${view.index + 1} / ${view.total})${view.done ? " · done" : ""}${view.editable ? "" : " · read-only"}`;
  state.reviewing = false;
  fit();
  refresh({ all: true, current: true });
  updateProgress();
  refreshImages();
  status(view.editable ? "ready: click an object" : "read-only: committed or taken by another annotator");
  if (view.dropped && view.dropped.length) status(`${view.dropped.length} input mask(s) of this image could not be shown: ${view.dropped[0]}`, true);
  state.ready = true;
}

// The queue with the source file names; a click opens an image.
async function refreshImages() {
  try {
    const rows = await (await api("GET", `/api/images?client=${encodeURIComponent(state.client)}`)).json();
    const current = state.view ? state.view.key : null;
    $("images").replaceChildren(...rows.map((r) => {
      const li = document.createElement("li");
      li.textContent = `${r.name} · ${r.status}`;
      li.title = r.key;
      li.dataset.key = r.key;
      li.className = `${r.status}${r.key === current ? " current" : ""}`;
      if (r.status !== "taken" && r.key !== current) li.addEventListener("click", () => openKey(r.key));
      return li;
    }));
    $("image-count").textContent = `(${rows.length})`;
  } catch (e) { /* the next refresh will tell */ }
}

function openKey(key) {
  const c = state.current;
  if (c && (c.prompted || c.edited)) { status("accept (Enter) or drop (Esc) the current mask first", true); return; }
  open(0, key);
}

// Masks without a label export as "object" under an id no label has (the one after the
// largest; 1 without labels), as +stage=export_coco does (pipeline/dataset/coco.py).
function unlabeledId() {
  return state.config.labels.reduce((top, l) => Math.max(top, l.id), 0) + 1;
}

// The session's labels (COCO categories), and "object" if a mask has no label.
function exportCategories(annotations, unlabeled) {
  const categories = state.config.labels.map((l) => ({ id: l.id, name: l.name }));
  if (annotations.some((a) => a.category_id === unlabeled)) categories.push({ id: unlabeled, name: "object" });
  return categories;
}

// Labels: Shift+1..9 (or a click in the list) sets the selected mask's label, and the
// label the next masks get.
function setLabel(index) {
  const label = state.config.labels[index];
  if (!label) return;
  state.label = label.id;
  const m = state.selected === null ? null : state.masks[state.selected];
  if (m && m.category_id !== label.id) {
    remember();
    state.masks = state.masks.map((x, i) => (i === state.selected ? { ...x, category_id: label.id } : x));
    refresh({ all: true });
    save();
  }
  listLabels();
  status(`label: ${label.name}${m ? " (this mask and the next)" : " (the next masks)"}`);
}

function listLabels() {
  const labels = state.config.labels;
  $("labels-section").hidden = !labels.length;
  $("labels").replaceChildren(...labels.map((l, i) => {
    const li = document.createElement("li");
    li.textContent = i < 9 ? `${l.name} · Shift+${i + 1}` : l.name;
    li.dataset.label = String(l.id);
    li.classList.toggle("active", l.id === state.label);
    li.addEventListener("click", () => setLabel(i));
    return li;
  }));
}

// This image's masks as a COCO JSON file (uncompressed RLE, the annotation tool's own
// fields kept), downloaded by the browser.
function exportJson() {
  const view = state.view;
  if (!view) return;
  const unlabeled = unlabeledId();
  const annotations = state.masks.map((m, i) => {
    if (!m.counts) m.counts = encodeCounts(m.mask, state.H, state.W);
    const area = m.counts.reduce((sum, run, r) => sum + (r % 2 ? run : 0), 0);
    const [x0, y0, x1, y1] = m.box || [0, 0, 0, 0];
    return { id: i + 1, image_id: view.image_id, category_id: m.category_id ?? unlabeled, iscrowd: 0, area, bbox: [x0, y0, x1 - x0, y1 - y0],
             segmentation: { size: [state.H, state.W], counts: m.counts }, provenance: m.provenance,
             clicks: m.clicks || 0, strokes: m.strokes || 0, annotator: m.annotator || "" };
  });
  const coco = { images: [{ id: view.image_id, file_name: view.source.split("/").pop(), width: state.W, height: state.H }],
                 annotations, categories: exportCategories(annotations, unlabeled) };
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([JSON.stringify(coco)], { type: "application/json" }));
  link.download = `${view.key}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  status(`exported ${annotations.length} mask(s) to ${link.download}`);
}

function toggleMasks() {
  state.masksVisible = !state.masksVisible;
  $("toggle-masks").textContent = state.masksVisible ? "Hide masks" : "Show masks";
  refresh({ all: true });
}

function cycleOpacity() {
  const steps = [1, 0.6, 0.3];
  state.opacity = steps[(steps.indexOf(state.opacity) + 1) % steps.length];
  $("opacity-value").textContent = `${Math.round(state.opacity * 100)}%`;
  refresh({ all: true, current: true });
}

async function markDone() {
  if (state.current && (state.current.prompted || state.current.edited)) { status("accept (Enter) or drop (Esc) the current mask first", true); return; }
  const auto = state.masks.filter((m) => m.provenance === "automatic").length;
  if (auto) { status(`${auto} automatic mask(s) not reviewed: accept (A, Shift+A) or delete them`, true); return; }
  if (await save(true)) { refreshImages(); await open(1); }
}

async function updateProgress() {
  try {
    const p = await (await api("GET", "/api/progress")).json();
    $("progress").textContent = `${p.done} / ${p.images} done · ${p.units_committed} / ${p.units} units committed`;
    if (p.lost) { state.lost = true; if (state.view) state.view.editable = false; status(`this server accepts no save: ${p.lost}`, true); }
  } catch (e) { /* the next update will tell */ }
}

// --- drawing: render.js ------------------------------------------------------------------
const renderer = new Renderer(state, canvas, stageEl, { select, remove });
const refresh = (what) => renderer.refresh(what);
const fit = () => renderer.fit();
const zoomAt = (factor, cx, cy) => renderer.zoomAt(factor, cx, cy);

// --- input ---------------------------------------------------------------------------------
function imagePoint(event) {
  const rect = canvas.getBoundingClientRect();
  const { s, tx, ty } = state.zoom;
  return [(event.clientX - rect.left - tx) / s, (event.clientY - rect.top - ty) / s];
}

function inside([x, y]) { return x >= 0 && y >= 0 && x < state.W && y < state.H; }

function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  $("tool-name").textContent = tool;
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("pointerdown", (event) => {
  if (!state.ready) return;
  const t0 = performance.now();
  stats.lastT0 = t0;
  stageEl.focus();
  canvas.setPointerCapture(event.pointerId);
  if (event.button === 1 || state.space) { state.drag = { pan: [event.clientX, event.clientY] }; return; }
  const p = imagePoint(event);
  if (!inside(p) || !state.view.editable) return;
  if (state.tool === "click") addPoint(p[0], p[1], event.button === 2 || event.shiftKey ? 0 : 1, t0);
  else if (state.tool === "box") state.drag = { box: [p[0], p[1], p[0], p[1]] };
  else if (state.tool === "brush" || state.tool === "eraser") { state.drag = { paint: state.tool === "brush" ? 1 : 0 }; strokeStart(p[0], p[1], state.drag.paint); }
  else if (state.tool === "select") {
    const [x, y] = [Math.floor(p[0]), Math.floor(p[1])];
    const hit = (m) => {
      if (m.mask) return m.mask[y * state.W + x] === 1;
      m.prefix ||= prefixSums(m.counts);
      return countsHas(m.prefix, state.H, x, y);
    };
    const index = state.masks.map((m, i) => i).reverse().find((i) => hit(state.masks[i]));
    select(index === undefined ? null : index);
  }
});
canvas.addEventListener("pointermove", (event) => {
  const drag = state.drag;
  if (!drag) return;
  if (drag.pan) {
    state.zoom.tx += event.clientX - drag.pan[0]; state.zoom.ty += event.clientY - drag.pan[1];
    drag.pan = [event.clientX, event.clientY]; refresh(); return;
  }
  const p = imagePoint(event);
  if (drag.box) { drag.box[2] = p[0]; drag.box[3] = p[1]; refresh(); }
  else if (drag.paint !== undefined) strokeTo(p[0], p[1], drag.paint);
});
canvas.addEventListener("pointerup", () => {
  const drag = state.drag;
  state.drag = null;
  if (drag && drag.box) {
    const [x0, y0, x1, y1] = drag.box;
    const clamp = (v, hi) => Math.max(0, Math.min(hi, v));
    const box = [clamp(Math.min(x0, x1), state.W), clamp(Math.min(y0, y1), state.H), clamp(Math.max(x0, x1), state.W), clamp(Math.max(y0, y1), state.H)];
    if (box[2] - box[0] >= 3 && box[3] - box[1] >= 3) setBox(box, performance.now());
    refresh();
  }
});
canvas.addEventListener("wheel", (event) => {
  event.preventDefault();
  const rect = canvas.getBoundingClientRect();
  zoomAt(Math.exp(-event.deltaY * 0.0015), event.clientX - rect.left, event.clientY - rect.top);
}, { passive: false });
window.addEventListener("resize", () => refresh());

window.addEventListener("keyup", (event) => { if (event.key === " ") state.space = false; });
window.addEventListener("keydown", (event) => {
  if (event.target === $("annotator")) { if (event.key === "Enter") event.target.blur(); return; }
  const key = event.key, ctrl = event.ctrlKey || event.metaKey;
  const digit = /^Digit([1-9])$/.exec(event.code);
  if (event.shiftKey && !ctrl && digit) { event.preventDefault(); setLabel(Number(digit[1]) - 1); return; }
  const centre = () => [stageEl.clientWidth / 2, stageEl.clientHeight / 2];
  if (ctrl && key.toLowerCase() === "z") { event.preventDefault(); event.shiftKey ? restore(state.redo, state.undo) : restore(state.undo, state.redo); return; }
  if (ctrl && key.toLowerCase() === "y") { event.preventDefault(); restore(state.redo, state.undo); return; }
  if (ctrl) return;
  const actions = {
    c: () => setTool("click"), b: () => setTool("box"), d: () => setTool("brush"), e: () => setTool("eraser"), v: () => setTool("select"),
    1: () => pickCandidate(1), 2: () => pickCandidate(2), 3: () => pickCandidate(3),
    Enter: accept, a: accept, A: acceptAllAutomatic, Delete: remove, Backspace: remove,
    Escape: () => { state.current = null; state.selected = null; state.reviewing = false; refresh({ all: true, current: true }); },
    Tab: () => select(state.masks.length ? ((state.selected ?? state.cursor ?? -1) + 1) % state.masks.length : null),
    "[": () => { state.brush = Math.max(1, Math.round(state.brush / 1.25)); $("brush-size").textContent = state.brush; },
    "]": () => { state.brush = Math.min(400, Math.round(state.brush * 1.25) + 1); $("brush-size").textContent = state.brush; },
    "+": () => zoomAt(1.25, ...centre()), "=": () => zoomAt(1.25, ...centre()), "-": () => zoomAt(0.8, ...centre()), 0: fit,
    n: () => leave(1), ArrowRight: () => leave(1), p: () => leave(-1), ArrowLeft: () => leave(-1), m: markDone,
    h: toggleMasks, o: cycleOpacity, r: review, x: exportJson,
    " ": () => { state.space = true; },
  };
  const action = actions[key];
  if (action) { event.preventDefault(); action(); }
});
document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
document.querySelectorAll("[data-candidate]").forEach((b) => b.addEventListener("click", () => pickCandidate(Number(b.dataset.candidate))));
$("annotator").addEventListener("change", (e) => localStorage.setItem("sam-annotator", e.target.value.trim()));
$("toggle-masks").addEventListener("click", toggleMasks);
$("opacity").addEventListener("click", cycleOpacity);
$("review").addEventListener("click", review);
$("export").addEventListener("click", exportJson);

// A closed tab gives its image back at once (not after the lease runs out), so a fresh
// page does not find the queue empty. keepalive lets the request outlive the page.
window.addEventListener("pagehide", () => {
  const view = state.view;
  if (!view || !view.editable) return;
  fetch("/api/release", { method: "POST", keepalive: true, headers: { "Content-Type": "application/json" },
                          body: JSON.stringify({ client: state.client, key: view.key, version: view.version }) });
});

// Renews the lease while the page is open, so that nobody else gets this image.
function heartbeat() {
  const view = state.view;
  if (view && view.editable) {
    api("POST", "/api/renew", { client: state.client, key: view.key, version: view.version }).catch((e) => {
      if (e.status === 409) { view.editable = false; status("the lease on this image was lost: open the next one", true); }
      if (e.status === 503) { view.editable = false; state.lost = true; status(`this server accepts no save: ${e.message}`, true); }
    });
  }
}

async function main() {
  try {
    state.config = await (await api("GET", "/api/config")).json();
    $("annotator").value = localStorage.getItem("sam-annotator") || state.config.annotator;
    $("brush-size").textContent = state.brush;
    state.label = state.config.labels.length ? state.config.labels[0].id : null;
    listLabels();
    setTool("click");
    status("loading the decoder…");
    state.decoder = await Decoder.load(state.config.model, state.config.threads);
    setInterval(heartbeat, (state.config.lease_s * 1000) / 3);
    await open(1);
  } catch (e) {
    status(`failed to start: ${e.message}`, true);
    console.error(e);
  }
}
main();
