// The dashboard: jobs list, live job page (SSE), submit form with plan preview, compare view.
// Plain DOM code; every user-provided string goes through textContent, never innerHTML.
"use strict";

const KEY_STORAGE = "rigl.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// The JobSpec's own defaults (rigl_core/spec.py; tests/service/test_service_api.py checks they agree): the
// New-job form starts from them, and a job without a field shows its default. Epochs follow the dataset
// (GET /v1/datasets' suggested_epochs).
const DEFAULTS = {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "delta_t": "auto", "alpha": 0.3, "epochs": 20, "batch_size": 128, "optimizer": "sgd", "lr": 0.1};
// sparsity.method's values (rigl_core/spec.py METHODS), for the form and the jobs filter
const METHODS = ["rigl", "srigl", "set", "snfs", "static", "snip", "gmp", "dense"];
let teardown = () => {};  // stops the current view's timers and streams

// ------------------------------------------------------------------ small DOM helpers
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const $ = sel => document.querySelector(sel);
const pct = v => (Number.isFinite(v) ? (100 * v).toFixed(1) + "%" : "—");
const num = (v, d = 4) => (Number.isFinite(v) ? v.toFixed(d) : "—");
const sig = v => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(3)) : String(v));  // a search's drawn values
const when = iso => (iso ? new Date(iso).toLocaleString() : "—");

function banner(message, kind) {
  const b = $("#banner");
  b.textContent = message || "";
  b.className = "banner " + (kind || "error");
  b.hidden = !message;
}

// ------------------------------------------------------------------ API access
function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function authHeaders(extra) {
  const headers = { ...(extra || {}) };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  return headers;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.field ? `${e.field}: ${e.message}` : e.message || `HTTP ${status}`);
    this.status = status;
    this.field = e.field;
  }
}

async function api(path, options) {
  const o = options || {};
  const headers = authHeaders(o.body !== undefined ? { "Content-Type": "application/json" } : {});
  const resp = await fetch(path, { method: o.method || "GET", headers,
    body: o.body !== undefined ? JSON.stringify(o.body) : undefined, signal: o.signal });
  let body = null;
  try { body = await resp.json(); } catch (_) { /* empty or not JSON */ }
  if (resp.status === 401) updateKeyState(true);
  else if (resp.ok && !apiKey()) updateKeyState(false, true);
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

/** Server-sent events read with fetch, so the API key can travel in a header. Resumes after drops. */
async function streamEvents(jobId, onEvent, state) {
  let after = 0;
  while (!state.stopped) {
    try {
      const resp = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events/stream?after=${after}`,
        { headers: authHeaders({ Accept: "text/event-stream" }), signal: state.controller.signal });
      if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trim()).join("\n");
          if (!data) continue;
          const event = JSON.parse(data);
          after = Math.max(after, event.id);
          onEvent(event);
        }
      }
      if (await state.finished()) return;  // the server ends the stream when the job has ended
    } catch (err) {
      if (state.stopped) return;
      if (err instanceof ApiError && err.status < 500) { banner(err.message); return; }
    }
    await new Promise(r => setTimeout(r, 1000));
  }
}

const EXPORT_KINDS = ["dense", "packed", "compressed", "condensed", "onnx"];  // the checkpoint route's formats, in this order

async function download(jobId, format, filename) {
  const resp = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/checkpoint?format=${format}`,
    { headers: authHeaders() });
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  const blob = await resp.blob();
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: `${jobId}-${filename}` });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ------------------------------------------------------------------ API key (kept for this tab only)
function updateKeyState(rejected, open) {
  const has = !!apiKey();
  $("#key-state").textContent = rejected ? "API key needed or rejected"
    : has ? "key set for this session" : open ? "this server needs no key" : "";
  $("#key-state").className = rejected ? "warn" : "muted";
  $("#key-forget").hidden = !has;
  $("#key-input").hidden = has && !rejected;
  $("#key-save").hidden = has && !rejected;
}

function setupKeyForm() {
  $("#key-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const value = $("#key-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY_STORAGE, value);
    $("#key-input").value = "";
    banner("");
    updateKeyState(false);
    route();
  });
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    updateKeyState(false);
    route();
  });
  updateKeyState(false);
}

// ------------------------------------------------------------------ job facts
function jobMethod(job) { return (job.spec.sparsity && job.spec.sparsity.method) || DEFAULTS.method; }
function jobSparsity(job) {
  if (job.result && Number.isFinite(job.result.sparsity)) return job.result.sparsity;
  if (jobMethod(job) === "dense") return 0;
  const s = job.spec.sparsity && job.spec.sparsity.sparsity;
  return Number.isFinite(s) ? s : DEFAULTS.sparsity;
}
function jobAccuracy(job) {
  const final = job.result && job.result.final_metrics;
  if (final && Number.isFinite(final.val_accuracy)) return final.val_accuracy;
  return job.metrics && Number.isFinite(job.metrics.val_accuracy) ? job.metrics.val_accuracy : NaN;
}
function tagChips(job, onPick) {  // each tag filters the jobs list by it
  return (job.tags || []).map(tag => h("a", { class: "tag", href: "#/?tag=" + encodeURIComponent(tag),
    onclick: onPick ? ev => { ev.preventDefault(); onPick(tag); } : null }, tag));
}
function statusBadge(status) { return h("span", { class: `status status-${status}` }, status); }
function progressBar(job) {
  const f = job.status === "succeeded" ? 1 : job.progress.fraction || 0;
  return h("div", { class: "progress", title: `${job.progress.step} / ${job.progress.total_steps} steps` },
    h("div", { class: "progress-fill", style: `width:${(100 * f).toFixed(1)}%` }),
    h("span", { class: "progress-text" }, `${(100 * f).toFixed(0)}%`));
}

// ------------------------------------------------------------------ jobs list
const FILTERS = { status: ["queued", "running", "requeued", "cancelling", "succeeded", "failed", "cancelled"],
  method: METHODS };

function jobsView(view, query) {
  const selected = new Set();
  const table = h("tbody");
  const compare = h("button", { id: "compare-selected", disabled: true,
    onclick: () => { location.hash = "#/compare?ids=" + [...selected].join(","); } }, "Compare selected");
  const more = h("button", { hidden: true }, "Load more");
  let cursor = null;
  // Filters (GET /v1/jobs?status=&method=&tag=&name_prefix=) live in the URL, so a filtered list can be linked.
  const choose = (name, label) => h("select", { id: `filter-${name}`, "aria-label": label },
    h("option", { value: "" }, label), ...FILTERS[name].map(v => h("option", { value: v }, v)));
  const filters = { status: choose("status", "any status"), method: choose("method", "any method"),
    tag: h("input", { id: "filter-tag", placeholder: "tag", "aria-label": "tag", size: 14 }),
    name_prefix: h("input", { id: "filter-name", placeholder: "name starts with", "aria-label": "name starts with", size: 18 }) };
  for (const [k, input] of Object.entries(filters)) input.value = (query && query.get(k)) || "";
  let typing = null;
  function applyFilters() {
    const params = new URLSearchParams();
    for (const [k, input] of Object.entries(filters)) if (input.value.trim()) params.set(k, input.value.trim());
    const qs = params.toString();
    history.replaceState(null, "", "#/" + (qs ? "?" + qs : ""));
    load(false);
  }
  for (const input of Object.values(filters)) {
    input.addEventListener(input.tagName === "SELECT" ? "change" : "input",
      () => { clearTimeout(typing); typing = setTimeout(applyFilters, input.tagName === "SELECT" ? 0 : 300); });
  }
  const pickTag = tag => { filters.tag.value = tag; applyFilters(); };
  const clear = h("button", { id: "filter-clear", onclick: () => {
    for (const input of Object.values(filters)) input.value = "";
    applyFilters();
  } }, "Clear filters");
  view.replaceChildren(
    h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/submit" }, "New job"), compare),
    h("div", { class: "toolbar filters", id: "job-filters" }, ...Object.values(filters), clear),
    h("table", { class: "jobs", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["", "Job", "Name", "Status", "Progress", "Method", "Sparsity", "Accuracy", "Created"]
        .map(t => h("th", {}, t)))), table),
    more);

  function row(job) {
    const box = h("input", { type: "checkbox", "aria-label": "select " + job.id, checked: selected.has(job.id),
      onchange: ev => { ev.target.checked ? selected.add(job.id) : selected.delete(job.id); compare.disabled = selected.size < 1; } });
    return h("tr", { "data-job": job.id },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
      h("td", { class: "job-name" }, job.name || "", " ", tagChips(job, pickTag)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, progressBar(job)),
      h("td", {}, jobMethod(job)),
      h("td", {}, pct(jobSparsity(job))),
      h("td", {}, pct(jobAccuracy(job))),
      h("td", {}, when(job.created_at)));
  }

  async function load(append) {
    const params = new URLSearchParams({ limit: "50" });
    for (const [k, input] of Object.entries(filters)) if (input.value.trim()) params.set(k, input.value.trim());
    if (append && cursor) params.set("after", cursor);
    try {
      const page = await api("/v1/jobs?" + params);
      if (!append) table.replaceChildren();
      for (const job of page.data) table.appendChild(row(job));
      const filtered = [...params.keys()].some(k => k in filters);
      if (!page.data.length && !append) {
        table.appendChild(h("tr", {}, h("td", { colspan: 9, class: "muted" }, filtered ? "No jobs match these filters."
          : ["No jobs yet: ", h("a", { href: "#/submit" }, "submit one"), "."])));
      }
      cursor = page.data.length ? page.data[page.data.length - 1].id : cursor;
      more.hidden = !page.has_more;
      banner("");
    } catch (err) { banner(err.message); }
  }
  more.addEventListener("click", () => load(true));
  load(false);
  const timer = setInterval(() => { if (more.hidden) load(false); }, 3000);
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------ job page
function jobView(view, jobId) {
  const state = { stopped: false, controller: new AbortController(),
    finished: async () => TERMINAL.has((await refreshJob()).status) };  // asked when a stream ends
  const data = { job: null, train: [], eval: [], updates: [], layers: null, totals: null, final: false, log: [] };
  const ids = ["chart-loss", "chart-accuracy", "chart-density", "chart-drop", "chart-exploration", "chart-flops"];
  const charts = Object.fromEntries(ids.map(id => [id, h("div", { class: "chart-box", id })]));
  const header = h("div", { class: "toolbar" });
  const summary = h("dl", { class: "summary", id: "job-summary" });
  const checkpoints = h("div", { id: "checkpoints" });
  const log = h("ol", { class: "log", id: "event-log" });
  const spec = h("pre", { class: "spec", id: "job-spec" });
  const layerHead = h("thead"), layerBody = h("tbody");
  const labels = labelsForm(jobId, job => { data.job = job; render(); });
  view.replaceChildren(header, labels.form, summary,
    h("section", { class: "grid" }, ...ids.map(id => charts[id])),
    h("h2", {}, "Layers"), h("table", { class: "jobs layers", id: "layer-table" }, layerHead, layerBody),
    h("section", { class: "two" },
      h("div", {}, h("h2", {}, "Checkpoints"), checkpoints, h("h2", {}, "Submitted spec"), spec),
      h("div", {}, h("h2", {}, "Events"), log)));

  // At most one redraw a second, on an animation frame: a hidden tab draws nothing, and a busy
  // stream costs the browser (often on the same machine as training) a redraw, not one per event.
  let timer = null;
  let lastRender = -1e9;
  function scheduleRender() {
    if (timer) return;
    const wait = Math.max(0, lastRender + 1000 - performance.now());
    timer = setTimeout(() => requestAnimationFrame(() => { timer = null; lastRender = performance.now(); render(); }), wait);
  }
  const drawn = { train: -1, eval: -1, updates: -1, layers: null, final: null, totals: null };

  function render() {
    const job = data.job;
    if (!job) return;
    const cancel = h("button", { id: "cancel-job", class: "danger", hidden: TERMINAL.has(job.status) || job.cancel_requested,
      onclick: async () => {
        try { data.job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); render(); } catch (err) { banner(err.message); }
      } }, "Cancel job");
    const edit = h("button", { id: "edit-labels", onclick: () => labels.open(data.job) }, "Edit labels");
    header.replaceChildren(h("h1", {}, "Job ", h("code", {}, job.id)), statusBadge(job.status), progressBar(job), edit, cancel);
    const totals = data.totals || {};
    const latest = data.updates[data.updates.length - 1];
    const facts = [
      ["Name", job.name || "—"],
      ["Tags", job.tags && job.tags.length ? tagChips(job) : "—"],
      ["Model", (job.spec.model && job.spec.model.name) || "—"],
      ["Dataset", (job.spec.dataset && job.spec.dataset.name) || "—"],
      ["Method", jobMethod(job)],
      ["Distribution", (job.spec.sparsity && job.spec.sparsity.distribution) || DEFAULTS.distribution],
      ["Sparsity", pct(jobSparsity(job))],
      ["Accuracy", pct(jobAccuracy(job))],
      ["Steps", `${job.progress.step} / ${job.progress.total_steps}`],
      ["Exploration", pct(Number.isFinite(totals.exploration) ? totals.exploration : latest ? latest.exploration : NaN)],
      ["Training FLOPs", Number.isFinite(totals.training_flops_ratio) ? `${num(totals.training_flops_ratio, 3)}× dense` : "—"],
      ["Inference FLOPs", Number.isFinite(totals.inference_flops_ratio) ? `${num(totals.inference_flops_ratio, 3)}× dense` : "—"],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at)],
    ];
    if (job.error) facts.push(["Error", `${job.error.code}: ${job.error.message}`]);
    if (job.metadata && Object.keys(job.metadata).length) {
      facts.push(["Metadata", h("code", { id: "job-metadata" }, JSON.stringify(job.metadata))]);
    }
    summary.replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    spec.textContent = JSON.stringify(job.spec, null, 2);

    // Charts are redrawn only when their data changed.
    if (drawn.train !== data.train.length || drawn.eval !== data.eval.length) {
      Charts.line(charts["chart-loss"], "Loss", [
        { name: "train loss", points: data.train.map(m => [m.step, m.loss]) },
        { name: "val loss", points: data.eval.map(m => [m.step, m.val_loss]), markers: true },
      ], { xLabel: "step", yLabel: "loss" });
      Charts.line(charts["chart-accuracy"], "Validation accuracy", [
        { name: "val accuracy", points: data.eval.map(m => [m.step, m.val_accuracy]), markers: true, color: "#16a34a" },
      ], { xLabel: "step", yLabel: "accuracy", yMin: 0, yMax: 1 });
    }
    if (drawn.updates !== data.updates.length || drawn.layers !== data.layers || drawn.final !== data.final) {
      const layers = currentLayers();
      renderDensity(layers);
      renderLayerTable(layers);
      Charts.line(charts["chart-drop"], "Drop fraction and mask churn per update", [
        { name: "drop fraction", points: data.updates.map(u => [u.step, u.drop_fraction]) },
        { name: "churn", points: data.updates.map(u => [u.step, u.churn]) },
      ], { xLabel: "step", yLabel: "fraction", yMin: 0, empty: "no mask updates (yet) for this method" });
      Charts.line(charts["chart-exploration"], "Exploration: share of weights ever active", [
        { name: "ever active", points: data.updates.map(u => [u.step, u.exploration]), color: "#7c3aed" },
      ], { xLabel: "step", yLabel: "share of masked weights", yMin: 0, empty: "no mask updates (yet) for this method" });
    }
    if (data.log.length) {
      log.prepend(...data.log.slice(-200).reverse().map(event => h("li", { class: `level-${event.level}` },
        h("span", { class: "muted" }, when(event.created_at) + " "), h("b", {}, event.type), " ", event.message)));
      data.log = [];
      while (log.childElementCount > 200) log.lastChild.remove();
    }
    if (drawn.totals !== data.totals) {
      const flops = Number.isFinite(totals.training_flops_ratio)
        ? [totals.training_flops_ratio, totals.inference_flops_ratio] : [];
      Charts.bars(charts["chart-flops"], "FLOPs vs dense (dense = 1)", flops.length ? ["training", "inference"] : [],
        [{ name: "sparse / dense", values: flops, color: "#0891b2" }, { name: "dense", values: flops.map(() => 1), color: "#cbd5e1" }],
        { yMax: 1, yLabel: "× dense FLOPs" });
    }
    Object.assign(drawn, { train: data.train.length, eval: data.eval.length, updates: data.updates.length,
      layers: data.layers, final: data.final, totals: data.totals });
  }

  /** The report's layer rows with nnz, density, active neurons and fan-in as of now: the report's when
   *  it is final, else the latest mask update's where it has the layer (the planned values before any). */
  function currentLayers() {
    const latest = data.updates.length ? data.updates[data.updates.length - 1].layers : null;
    return (data.layers || []).map(r => {
      const u = !data.final && latest && latest[r.name];
      if (!u || !u.numel) return r;
      return { ...r, nnz: u.n_active, density: u.n_active / u.numel,
        active_neurons: u.active_neurons ?? r.active_neurons, fan_in: u.fan_in ?? r.fan_in };
    });
  }

  function renderDensity(layers) {
    const rows = layers.filter(r => r.masked);
    Charts.bars(charts["chart-density"], `Per-layer density: target vs ${data.final ? "achieved" : "current"}`,
      rows.map(r => r.name), [
        { name: "target", values: rows.map(r => r.target_density), color: "#94a3b8" },
        { name: data.final ? "achieved" : "current", values: rows.map(r => r.density), color: "#2563eb" },
      ], { yMax: 1, yLabel: "density", empty: "no masked layers" });
  }

  function renderLayerTable(layers) {
    const fanIn = layers.some(r => Number.isFinite(r.fan_in));  // a constant fan-in run
    layerHead.replaceChildren(h("tr", {}, ["Layer", "Shape", "Target density", data.final ? "Achieved density" : "Current density",
      "Nonzeros", ...(fanIn ? ["Active neurons", "Fan-in"] : [])].map(t => h("th", {}, t))));
    layerBody.replaceChildren(...layers.map(r => h("tr", { "data-layer": r.name },
      h("td", {}, r.name), h("td", {}, (r.shape || []).join("×")),
      h("td", {}, pct(r.target_density) + (r.masked ? "" : ` (${r.reason})`)), h("td", {}, pct(r.density)),
      h("td", {}, Number.isFinite(r.nnz) ? r.nnz.toLocaleString() : "—"),
      fanIn ? h("td", {}, Number.isFinite(r.active_neurons) ? `${r.active_neurons} of ${r.neurons}` : "—") : null,
      fanIn ? h("td", {}, Number.isFinite(r.fan_in) ? String(r.fan_in) : "—") : null)));
    if (!layers.length) layerBody.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "no layer report for this job")));
  }

  async function refreshJob() {
    try {
      const was = data.job && data.job.status;
      data.job = await api(`/v1/jobs/${jobId}`);
      if (was !== data.job.status || !data.layers) await refreshReport();
      if (TERMINAL.has(data.job.status)) await refreshCheckpoints();
      banner("");
      scheduleRender();
    } catch (err) { banner(err.message); }
    return data.job;
  }

  async function refreshReport() {
    try {
      const report = await api(`/v1/jobs/${jobId}/sparsity`);
      data.layers = report.layers;
      data.totals = report.totals;
      data.final = report.final;
    } catch (_) { /* no plan for this job (e.g. an unknown shape): the chart says so */ }
  }

  async function refreshCheckpoints() {
    try {
      const list = await api(`/v1/jobs/${jobId}/checkpoints`);
      const exports = list.data.filter(c => EXPORT_KINDS.includes(c.kind))
        .sort((a, b) => EXPORT_KINDS.indexOf(a.kind) - EXPORT_KINDS.indexOf(b.kind));
      checkpoints.replaceChildren(...(exports.length ? exports.map(c =>
        h("div", { class: "checkpoint" },
          h("button", { id: `download-${c.kind}`, onclick: () => download(jobId, c.kind, c.filename).catch(e => banner(e.message)) },
            `Download ${c.kind}`),
          h("span", { class: "muted" }, ` ${c.filename}, ${Charts.fmt(c.size)}B, step ${c.step}, sha256 ${c.sha256.slice(0, 12)}…`)))
        : [h("p", { class: "muted" }, "No sparse checkpoint: the job did not succeed.")]));
    } catch (err) { banner(err.message); }
  }

  function onEvent(event) {
    const d = event.data || {};
    if (event.type === "metrics") data.train.push(d);
    else if (event.type === "eval") data.eval.push(d);
    else if (event.type === "mask_update") data.updates.push(d);
    if (event.type !== "metrics") data.log.push(event);  // drawn with the next render, not one DOM write per event
    if (event.type === "status" || event.type === "checkpoint") refreshJob();
    scheduleRender();
  }

  checkpoints.appendChild(h("p", { class: "muted" }, "Checkpoints appear when the job has finished."));
  refreshJob().then(() => { if (data.job) streamEvents(jobId, onEvent, state); });
  const poll = setInterval(() => { if (data.job && !TERMINAL.has(data.job.status)) refreshJob(); }, 2000);
  return () => { state.stopped = true; state.controller.abort(); clearInterval(poll); };
}

/** The job page's label editor: name, tags and metadata, sent as one JSON merge patch (PATCH /v1/jobs/{id})
 *  that turns the job's labels into the form's. Built once, so a redraw never loses what is being typed. */
function labelsForm(jobId, onSaved) {
  const input = (id, attrs) => h("input", { type: "text", id, ...(attrs || {}) });
  const name = input("edit-name", { maxlength: 200, placeholder: "none" });
  const tags = input("edit-tags", { placeholder: "e.g. sweep, gpu" });
  const metadata = h("textarea", { id: "edit-metadata", rows: 4, spellcheck: "false" });
  let before = {};
  const form = h("form", { id: "labels-form", class: "form", hidden: true,
    onsubmit: async event => {
      event.preventDefault();
      let meta;
      try { meta = metadata.value.trim() ? JSON.parse(metadata.value) : {}; } catch (err) {
        banner(`metadata: not JSON (${err.message})`); return;
      }
      const patch = { name: name.value.trim() || null,
        tags: tags.value.split(",").map(s => s.trim()).filter(Boolean), metadata: mergeDiff(before, meta) };
      try {
        const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "PATCH", body: patch });
        form.hidden = true; banner(""); onSaved(job);
      } catch (err) { banner(err.message); }
    } },
    h("label", {}, h("span", {}, "Name"), name),
    h("label", {}, h("span", {}, "Tags"), tags, h("small", { class: "muted" }, "comma-separated; a-z 0-9 _ . : -")),
    h("label", {}, h("span", {}, "Metadata (JSON object)"), metadata),
    h("div", {}, h("button", { class: "primary", type: "submit", id: "save-labels" }, "Save"), " ",
      h("button", { type: "button", onclick: () => { form.hidden = true; } }, "Close")));
  function open(job) {
    before = job.metadata || {};
    name.value = job.name || "";
    tags.value = (job.tags || []).join(", ");
    metadata.value = JSON.stringify(before, null, 2);
    form.hidden = false;
  }
  return { form, open };
}

/** The JSON merge patch (RFC 7396) that turns object `a` into object `b`: a removed key is null. */
function mergeDiff(a, b) {
  const isObject = v => v !== null && typeof v === "object" && !Array.isArray(v);
  if (!isObject(a) || !isObject(b)) return b;
  const patch = {};
  for (const key of Object.keys(a)) if (!(key in b)) patch[key] = null;
  for (const [key, value] of Object.entries(b)) {
    if (JSON.stringify(a[key]) === JSON.stringify(value)) continue;
    patch[key] = isObject(a[key]) && isObject(value) ? mergeDiff(a[key], value) : value;
  }
  return patch;
}

// ------------------------------------------------------------------ submit form
function submitView(view) {
  const field = (label, input, hint) => h("label", {}, h("span", {}, label), input, hint ? h("small", { class: "muted" }, hint) : null);
  const select = (name, options, value) => h("select", { name, id: `f-${name}` },
    options.map(o => h("option", { value: o, selected: o === value }, o)));
  const number = (name, value, attrs) => h("input", { type: "number", name, id: `f-${name}`, value, ...(attrs || {}) });
  const text = (name, attrs) => h("input", { type: "text", name, id: `f-${name}`, ...(attrs || {}) });
  const form = h("form", { id: "submit-form", class: "form" },
    field("Name", text("name", { maxlength: 200, placeholder: "optional" }), "a label for the jobs list"),
    field("Tags", text("tags", { placeholder: "e.g. sweep, gpu" }), "comma-separated; a-z 0-9 _ . : -"),
    field("Model", select("model", ["mlp", "lenet5", "wrn-22-2", "resnet18-cifar"], "mlp"), "built-in or uploaded architecture"),
    field("Dataset", select("dataset", ["digits", "mnist1d", "synthetic"], "digits")),
    field("Method", select("method", METHODS, DEFAULTS.method), "srigl: RigL with constant fan-in and neuron ablation"),
    field("Sparsity", number("sparsity", String(DEFAULTS.sparsity), { min: 0, max: 0.999, step: 0.01 }), "share of masked weights that are zero"),
    field("Distribution", select("distribution", ["erk", "er", "uniform"], DEFAULTS.distribution)),
    field("ΔT (steps between updates)", text("delta_t", { value: DEFAULTS.delta_t, pattern: "auto|[0-9]+", inputmode: "numeric" }),
      "auto: about 10 mask updates over the run (100 steps on runs of 1,000+), or a number of steps"),
    field("α (initial drop fraction)", number("alpha", String(DEFAULTS.alpha), { min: 0.01, max: 1, step: 0.01 })),
    field("Epochs", number("epochs", String(DEFAULTS.epochs), { min: 1, step: 1 }), "set from the dataset's suggested length"),
    field("Batch size", number("batch_size", String(DEFAULTS.batch_size), { min: 1, step: 1 })),
    field("Optimizer", select("optimizer", ["sgd", "nesterov", "adam", "adamw"], DEFAULTS.optimizer)),
    field("Learning rate", number("lr", String(DEFAULTS.lr), { min: 0.000001, step: "any" })));
  const json = h("textarea", { id: "spec-json", rows: 18, spellcheck: "false", "aria-label": "JobSpec JSON" });
  const submit = h("button", { type: "button", id: "submit-job", class: "primary" }, "Submit job");
  const error = h("p", { id: "submit-error", class: "error", hidden: true });
  const planBox = h("div", { class: "chart-box", id: "plan-chart" });
  const planHead = h("thead"), planTable = h("tbody");
  const planTotals = h("p", { id: "plan-totals", class: "muted" }, "Plan preview loads as you edit.");
  view.replaceChildren(h("h1", {}, "New job"),
    h("section", { class: "two" },
      h("div", {}, form, h("h2", {}, "JobSpec"), h("p", { class: "muted" }, "Built from the form; edit it for any other field (see /docs)."),
        json, error, submit),
      h("div", {}, h("h2", {}, "Plan preview"), planTotals, planBox,
        h("table", { class: "plan", id: "plan-table" }, planHead, planTable))));

  const uploads = { models: {}, datasets: {} };
  function fromForm() {
    const v = name => form.elements[name].value;
    const upload = uploads.models[v("model")];  // an uploaded program is named by model.program
    const model = !upload ? { name: v("model") } : upload.kind === "program" ? { program: upload.id } : { name: upload.id };
    const dataset = uploads.datasets[v("dataset")] ? { name: "tensors", path: uploads.datasets[v("dataset")] } : { name: v("dataset") };
    const spec = {
      model, dataset,
      sparsity: { method: v("method"), sparsity: +v("sparsity"), distribution: v("distribution"),
        schedule: { delta_t: v("delta_t").trim() === "auto" ? "auto" : +v("delta_t"), alpha: +v("alpha") } },
      training: { epochs: +v("epochs"), batch_size: +v("batch_size"), optimizer: v("optimizer"), lr: +v("lr") },
    };
    // labels beside the spec, only when filled in (so ones typed into the JSON survive form edits)
    const tags = v("tags").split(",").map(s => s.trim()).filter(Boolean);
    if (v("name").trim()) spec.name = v("name").trim();
    if (tags.length) spec.tags = tags;
    return spec;
  }
  function currentSpec() {
    try { return JSON.parse(json.value); } catch (err) { throw new Error("JobSpec: not valid JSON: " + err.message); }
  }

  let planTimer = null;
  let planSeq = 0;
  function schedulePlan() {
    clearTimeout(planTimer);
    planTimer = setTimeout(runPlan, 250);
  }
  async function runPlan() {
    const seq = ++planSeq;
    let spec;
    try { spec = currentSpec(); } catch (err) { planTotals.textContent = err.message; return; }
    try {
      const plan = await api("/v1/plan", { method: "POST", body: { model: spec.model, sparsity: spec.sparsity || {}, dataset: spec.dataset } });
      if (seq !== planSeq) return;
      const t = plan.totals;
      planTotals.textContent = `${plan.model} on input ${JSON.stringify(plan.input_shape)}: ${Charts.fmt(t.params)} params, ` +
        `${Charts.fmt(t.nnz)} nonzero, sparsity ${pct(t.sparsity)} of masked weights; inference FLOPs ` +
        `${num(t.inference_flops_ratio, 3)}× dense, training FLOPs ${num(t.training_flops_ratio, 3)}× dense`;
      planTotals.className = "";
      const rows = plan.layers;
      Charts.bars(planBox, "Planned density per layer", rows.map(r => r.name),
        [{ name: "target density", values: rows.map(r => r.target_density), color: "#2563eb" }], { yMax: 1, yLabel: "density" });
      const fanIn = rows.some(r => Number.isFinite(r.fan_in));  // structure fan-in: inputs per active neuron
      planHead.replaceChildren(h("tr", {}, ["Layer", "Params", "Target density", "FLOPs", ...(fanIn ? ["Fan-in"] : [])]
        .map(t => h("th", {}, t))));
      planTable.replaceChildren(...rows.map(r => h("tr", {}, h("td", {}, r.name), h("td", {}, Charts.fmt(r.params)),
        h("td", {}, pct(r.target_density) + (r.masked ? "" : ` (${r.reason})`)), h("td", {}, Charts.fmt(r.flops_sparse)),
        fanIn ? h("td", { title: Number.isFinite(r.fan_in) ? `${r.active_neurons} of ${r.neurons} neurons` : null },
          Number.isFinite(r.fan_in) ? String(r.fan_in) : "—") : null)));
    } catch (err) {
      if (seq !== planSeq) return;
      planTotals.textContent = "Plan: " + err.message;
      planTotals.className = "error";
    }
  }

  // Form edits are merged into the JSON, so fields typed into the JSON by hand survive them.
  function merge(base, patch) {
    const out = { ...base };
    for (const [k, v] of Object.entries(patch)) {
      const both = v && typeof v === "object" && !Array.isArray(v) && out[k] && typeof out[k] === "object";
      out[k] = both ? merge(out[k], v) : v;
    }
    return out;
  }
  const suggestedEpochs = {};  // dataset name → epochs, from GET /v1/datasets
  let shownDataset = form.elements.dataset.value;
  function followDataset() {  // a new dataset brings its own suggested length
    const name = form.elements.dataset.value;
    if (name === shownDataset) return;
    shownDataset = name;
    if (suggestedEpochs[name]) form.elements.epochs.value = String(suggestedEpochs[name]);
  }
  form.addEventListener("input", () => {
    followDataset();
    let base = {};
    try { base = JSON.parse(json.value); } catch (_) { /* unparsable JSON: the form starts it afresh */ }
    const patch = fromForm();
    const spec = merge(base, patch);
    // a different model or dataset replaces the whole section (its other fields belonged to the old one)
    if (base.model && (base.model.name !== patch.model.name || base.model.program !== patch.model.program)) spec.model = patch.model;
    if (base.dataset && base.dataset.name !== patch.dataset.name) spec.dataset = patch.dataset;
    json.value = JSON.stringify(spec, null, 2);
    schedulePlan();
  });
  json.addEventListener("input", schedulePlan);
  submit.addEventListener("click", async () => {
    error.hidden = true;
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: currentSpec() });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
    } finally { submit.disabled = false; }
  });

  (async () => {  // uploaded architectures and datasets join the choices
    try {
      const [archs, datasets] = await Promise.all([api("/v1/architectures"), api("/v1/datasets")]);
      for (const a of archs.data) {
        const label = `${a.name} (${a.id})`;
        uploads.models[label] = a;
        form.elements.model.appendChild(h("option", { value: label }, label));
      }
      for (const name of datasets.builtin) {
        if (![...form.elements.dataset.options].some(o => o.value === name)) form.elements.dataset.appendChild(h("option", { value: name }, name));
      }
      Object.assign(suggestedEpochs, datasets.suggested_epochs || {});
      const suggested = suggestedEpochs[form.elements.dataset.value];
      if (suggested && String(suggested) !== form.elements.epochs.value) {  // the first dataset's own length
        form.elements.epochs.value = String(suggested);
        form.dispatchEvent(new Event("input"));
      }
      for (const d of datasets.data) {
        const label = `${d.name} (${d.id})`;
        uploads.datasets[label] = d.id;
        form.elements.dataset.appendChild(h("option", { value: label }, label));
      }
    } catch (err) { banner(err.message); }
  })();
  json.value = JSON.stringify(fromForm(), null, 2);
  runPlan();
  return () => clearTimeout(planTimer);
}

// ------------------------------------------------------------------ compare view
/** Job → its series on the compare chart: the method, plus the model, dataset and training length where the
 * jobs differ in them (a line through jobs of different models or lengths would compare nothing). */
function compareSeries(jobs) {
  const training = j => j.spec.training || {};
  const parts = {
    model: j => (j.spec.model && (j.spec.model.name || (j.spec.model.hf && j.spec.model.hf.model_type))) || "model",
    dataset: j => (j.spec.dataset && j.spec.dataset.name) || "dataset",
    length: j => training(j).max_steps ? `${training(j).max_steps} steps` : `${training(j).epochs || DEFAULTS.epochs} ep`,
  };
  const varying = Object.values(parts).filter(part => new Set(jobs.map(part)).size > 1);
  return new Map(jobs.map(j => [j, [jobMethod(j), ...varying.map(part => part(j))].join(" · ")]));
}

function compareView(view, query) {
  const ids = (query.get("ids") || "").split(",").filter(Boolean);
  const chart = h("div", { class: "chart-box wide", id: "compare-chart" });
  const table = h("tbody");
  view.replaceChildren(h("h1", {}, "Compare: accuracy vs sparsity"),
    h("p", { class: "muted" }, (ids.length ? "Selected jobs" : "No jobs selected: showing the latest finished jobs") +
      "; one colour and line per method and setting (model, dataset and training length, named where the jobs differ)" +
      (ids.length ? "." : ". Pick jobs on the "),
      ids.length ? null : h("a", { href: "#/" }, "jobs list"), ids.length ? null : "."),
    chart, h("table", { class: "jobs", id: "compare-table" }, h("thead", {}, h("tr", {},
      ["Job", "Series", "Method", "Distribution", "Sparsity", "Accuracy", "Inference FLOPs", "Training FLOPs"]
        .map(t => h("th", {}, t)))), table));
  (async () => {
    try {
      const jobs = ids.length ? await Promise.all(ids.map(id => api(`/v1/jobs/${encodeURIComponent(id)}`)))
        : (await api("/v1/jobs?status=succeeded&limit=100")).data;
      const series = compareSeries(jobs);
      const points = jobs.filter(j => Number.isFinite(jobAccuracy(j))).map(j =>
        ({ x: jobSparsity(j), y: jobAccuracy(j), label: j.id.slice(-6), group: series.get(j) }));
      const xs = points.map(p => p.x), ys = points.map(p => p.y);
      Charts.scatter(chart, "Validation accuracy vs sparsity", points, {
        xLabel: "sparsity", yLabel: "validation accuracy", xFmt: v => (100 * v).toFixed(0) + "%", connect: true,
        xMin: Math.max(0, Math.min(...xs) - 0.05), xMax: Math.min(1, Math.max(...xs) + 0.05),
        yMin: Math.max(0, Math.min(...ys) - 0.05), yMax: Math.min(1, Math.max(...ys) + 0.05),
        empty: "no finished jobs to compare yet" });
      table.replaceChildren(...jobs.map(j => h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)),
        h("td", {}, series.get(j)), h("td", {}, jobMethod(j)), h("td", {}, (j.spec.sparsity && j.spec.sparsity.distribution) || DEFAULTS.distribution),
        h("td", {}, pct(jobSparsity(j))), h("td", {}, pct(jobAccuracy(j))),
        h("td", {}, j.result ? num(j.result.inference_flops_ratio, 3) + "×" : "—"),
        h("td", {}, j.result ? num(j.result.training_flops_ratio, 3) + "×" : "—"))));
    } catch (err) { banner(err.message); }
  })();
  return () => {};
}

// ------------------------------------------------------------------ sweeps
function sweepsView(view) {
  const table = h("tbody");
  view.replaceChildren(h("h1", {}, "Sweeps"),
    h("p", { class: "muted" }, "Grids of jobs (POST /v1/sweeps, or `rigl sweep FILE`); children past your active-job cap wait as held."),
    h("table", { class: "jobs", id: "sweeps-table" }, h("thead", {}, h("tr", {},
      ["Sweep", "Name", "Status", "Finished", "Children by status", "Created"].map(t => h("th", {}, t)))), table));
  async function load() {
    try {
      const sweeps = (await api("/v1/sweeps?limit=100")).data;
      table.replaceChildren(...sweeps.map(s => h("tr", {},
        h("td", {}, h("a", { href: `#/sweeps/${s.id}` }, s.id)), h("td", {}, s.name || "—"), h("td", {}, statusBadge(s.status)),
        h("td", {}, `${s.progress.finished}/${s.progress.total}`),
        h("td", {}, Object.entries(s.progress.by_status).map(([k, v]) => `${k} ${v}`).join(", ")), h("td", {}, when(s.created_at)))));
      if (!sweeps.length) table.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "no sweeps yet")));
    } catch (err) { banner(err.message); }
  }
  load();
  const timer = setInterval(load, 5000);
  return () => clearInterval(timer);
}

function sweepView(view, sweepId) {
  const head = h("div");
  const flops = h("div", { class: "chart-box", id: "sweep-flops" });
  const size = h("div", { class: "chart-box", id: "sweep-size" });
  const latency = h("div", { class: "chart-box", id: "sweep-latency" });
  const groups = h("tbody"), children = h("tbody");
  const cancel = h("button", { type: "button", id: "sweep-cancel" }, "Cancel sweep");
  view.replaceChildren(h("h1", {}, "Sweep ", h("code", {}, sweepId)), head, h("p", {}, cancel),
    h("div", { class: "grid" }, flops, size, latency),
    h("h2", {}, "Aggregate (mean ± sd over seeds)"),
    h("table", { class: "jobs", id: "sweep-aggregate" }, h("thead", {}, h("tr", {},
      ["Method", "Structure", "Distribution", "Sparsity", "Succeeded", "Val accuracy", "Inference FLOPs", "Packed bytes",
        "Latency (ms)", "Frontier"]
        .map(t => h("th", {}, t)))), groups),
    h("h2", {}, "Children"),
    h("table", { class: "jobs", id: "sweep-children" }, h("thead", {}, h("tr", {},
      ["Job", "Status", "Method", "Structure", "Distribution", "Sparsity", "Seed", "Trial", "Progress", "Val accuracy", "Latency (ms)"]
        .map(t => h("th", {}, t)))), children));
  let sweep = null;
  const structureOf = params => params.structure || "unstructured";  // children from before structure was an axis
  function chart(box, cost, front, label, xLabel) {
    const done = sweep.aggregate.filter(g => Number.isFinite(g.val_accuracy.mean) && Number.isFinite(g[cost]));
    const points = done.map(g => ({ x: g[cost], y: g.val_accuracy.mean, group: g.method,
      label: `${g.distribution} ${g.sparsity}` + (structureOf(g) === "unstructured" ? "" : ` ${g.structure}`) }));
    const keyed = Object.fromEntries(done.map(g => [g.key, g]));
    const frontier = (sweep.frontier[front] || []).filter(k => keyed[k]).map(k => ({ x: keyed[k][cost], y: keyed[k].val_accuracy.mean }));
    const xs = points.map(p => p.x), ys = points.map(p => p.y);
    Charts.scatter(box, `Validation accuracy vs ${label}`, points, { xLabel: xLabel || label, yLabel: "validation accuracy (mean)",
      frontier, yMin: Math.max(0, Math.min(...ys) - 0.02), yMax: Math.min(1, Math.max(...ys) + 0.02),
      xMin: Math.min(...xs) * 0.9, xMax: Math.max(...xs) * 1.05, empty: "no finished children yet" });
  }
  function render() {
    const p = sweep.progress;
    head.replaceChildren(h("p", {}, statusBadge(sweep.status), ` ${sweep.name || ""} — ${p.finished}/${p.total} children finished (`,
      Object.entries(p.by_status).map(([k, v]) => `${k} ${v}`).join(", "), ")"),
      sweep.strategy && sweep.strategy !== "grid" ? h("p", { id: "sweep-search" }, `${sweep.strategy} search, ${sweep.trials} trials` +
        (sweep.pruned ? `, ${sweep.pruned} pruned` : "") + (sweep.best ? ` — best: ${sweep.best.id} (val_accuracy ${num(sweep.best.val_accuracy)}; ` +
        Object.entries(sweep.best.params).map(([k, v]) => `${k} ${sig(v)}`).join(", ") + ")" : "")) : "");
    cancel.hidden = sweep.status !== "active";
    chart(flops, "inference_flops_ratio", "flops", "inference FLOPs (× dense)");
    chart(size, "packed_bytes", "size", "packed export (bytes)");
    chart(latency, "latency_ms", "latency", "measured latency (batch 1, CPU)", "latency (ms), condensed model for fan-in runs");
    groups.replaceChildren(...sweep.aggregate.map(g => h("tr", {}, h("td", {}, g.method), h("td", {}, structureOf(g)),
      h("td", {}, g.distribution),
      h("td", {}, pct(g.sparsity)), h("td", {}, `${g.succeeded}/${g.children}`),
      h("td", {}, Number.isFinite(g.val_accuracy.mean) ? num(g.val_accuracy.mean) + (Number.isFinite(g.val_accuracy.sd) ? " ± " + num(g.val_accuracy.sd) : "") : "—"),
      h("td", {}, Number.isFinite(g.inference_flops_ratio) ? num(g.inference_flops_ratio, 3) + "×" : "—"),
      h("td", {}, Number.isFinite(g.packed_bytes) ? Math.round(g.packed_bytes).toLocaleString() : "—"),
      h("td", {}, num(g.latency_ms, 3)),
      h("td", {}, Object.entries(g.on_frontier || {}).filter(([, on]) => on).map(([k]) => k).join(", ") || "—"))));
    children.replaceChildren(...sweep.children.map(c => h("tr", {},
      h("td", {}, c.id ? h("a", { href: `#/jobs/${c.id}` }, c.id) : "—"),
      h("td", {}, c.pruned ? h("span", { class: "status status-pruned", title: c.pruned }, "pruned") : statusBadge(c.status)),
      h("td", {}, c.params.method), h("td", {}, structureOf(c.params)), h("td", {}, c.params.distribution),
      h("td", {}, pct(c.params.sparsity)), h("td", {}, String(c.params.seed)),
      h("td", { title: c.point ? JSON.stringify(c.point) : "" }, c.trial === null || c.trial === undefined ? "—" : `#${c.trial} ` +
        Object.entries(c.point || {}).filter(([k]) => k.includes(".")).map(([k, v]) => `${k.split(".").pop()} ${sig(v)}`).join(" ")),
      h("td", {}, pct(c.progress)),
      h("td", {}, pct(c.val_accuracy)), h("td", {}, num(c.latency_ms, 3)))));
  }
  async function load() {
    try {
      sweep = await api(`/v1/sweeps/${encodeURIComponent(sweepId)}`);
      render();
    } catch (err) { banner(err.message); }
  }
  cancel.addEventListener("click", async () => {
    try { sweep = await api(`/v1/sweeps/${encodeURIComponent(sweepId)}/cancel`, { method: "POST" }); render(); }
    catch (err) { banner(err.message); }
  });
  load();
  const timer = setInterval(() => { if (!sweep || sweep.status === "active") load(); }, 3000);  // the frontier grows live
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------ routing
function route() {
  teardown();
  banner("");
  const [path, queryString] = (location.hash.slice(1) || "/").split("?");
  const query = new URLSearchParams(queryString || "");
  const view = $("#view");
  const parts = path.split("/").filter(Boolean);
  let active = "jobs";
  if (parts[0] === "jobs" && parts[1]) teardown = jobView(view, decodeURIComponent(parts[1]));
  else if (parts[0] === "submit") { active = "submit"; teardown = submitView(view); }
  else if (parts[0] === "compare") { active = "compare"; teardown = compareView(view, query); }
  else if (parts[0] === "sweeps" && parts[1]) { active = "sweeps"; teardown = sweepView(view, decodeURIComponent(parts[1])); }
  else if (parts[0] === "sweeps") { active = "sweeps"; teardown = sweepsView(view); }
  else teardown = jobsView(view, query);
  document.querySelectorAll("[data-nav]").forEach(a => a.classList.toggle("active", a.dataset.nav === active));
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => { setupKeyForm(); route(); });
