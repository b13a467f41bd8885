// Small SVG charts (line, grouped bar, scatter): no library, no CDN, text set via textContent only.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 640, H = 280, M = { top: 26, right: 16, bottom: 44, left: 58 };
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, attrs) {
    const node = el("text", { x, y, ...(attrs || {}) }, parent);
    node.textContent = content;
    return node;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(f => f * mag).find(s => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100 || v === 0) return String(Math.round(v));
    return String(+v.toPrecision(3));
  }

  function frame(container, title) {
    container.replaceChildren();
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" }, container);
    if (title) {
      svg.setAttribute("aria-label", title);
      text(svg, M.left, 16, title, { class: "chart-title" });
    }
    return svg;
  }

  function empty(svg, message) {
    text(svg, W / 2, H / 2, message || "no data yet", { class: "chart-empty", "text-anchor": "middle" });
  }

  function axes(svg, x, y, xTicks, yTicks, xLabel, yLabel, xFmt) {
    const g = el("g", { class: "axes" }, svg);
    for (const t of yTicks) {
      el("line", { x1: M.left, x2: W - M.right, y1: y(t), y2: y(t), class: "grid" }, g);
      text(g, M.left - 6, y(t) + 4, fmt(t), { "text-anchor": "end" });
    }
    for (const t of xTicks) text(g, x(t), H - M.bottom + 16, (xFmt || fmt)(t), { "text-anchor": "middle" });
    el("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }, g);
    el("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }, g);
    if (xLabel) text(g, (M.left + W - M.right) / 2, H - 6, xLabel, { "text-anchor": "middle", class: "label" });
    if (yLabel) text(g, 14, (M.top + H - M.bottom) / 2, yLabel,
      { "text-anchor": "middle", class: "label", transform: `rotate(-90 14 ${(M.top + H - M.bottom) / 2})` });
  }

  function legend(svg, series) {
    let x = W - M.right;
    for (let i = series.length - 1; i >= 0; i--) {
      const s = series[i];
      const label = text(svg, x, 16, s.name, { "text-anchor": "end", class: "legend" });
      const width = Math.max(30, s.name.length * 6.5);
      el("rect", { x: x - width - 14, y: 8, width: 10, height: 10, fill: s.color || PALETTE[i % PALETTE.length] }, svg);
      label.setAttribute("x", x);
      x -= width + 24;
    }
  }

  function extent(values, fixed) {
    let lo = fixed && Number.isFinite(fixed[0]) ? fixed[0] : Math.min(...values);
    let hi = fixed && Number.isFinite(fixed[1]) ? fixed[1] : Math.max(...values);
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    return [lo, hi];
  }

  /** At most ~2×buckets points, keeping each bucket's lowest and highest value so spikes survive. */
  function thin(points, buckets) {
    if (points.length <= 2 * buckets) return points;
    const out = [];
    const size = points.length / buckets;
    for (let b = 0; b < buckets; b++) {
      const chunk = points.slice(Math.floor(b * size), Math.floor((b + 1) * size));
      if (!chunk.length) continue;
      let lo = chunk[0], hi = chunk[0];
      for (const p of chunk) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
      if (lo === hi) out.push(lo); else out.push(...(lo[0] < hi[0] ? [lo, hi] : [hi, lo]));
    }
    return out;
  }

  /** series: [{name, color, points: [[x, y], ...]}]; options: xLabel, yLabel, yMin, yMax. */
  function line(container, title, series, options) {
    const o = options || {};
    const svg = frame(container, title);
    const all = series.flatMap(s => s.points.filter(p => Number.isFinite(p[1])));
    if (!all.length) return empty(svg, o.empty);
    const [x0, x1] = extent(all.map(p => p[0]));
    const [y0, y1] = extent(all.map(p => p[1]), [o.yMin, o.yMax]);
    const x = v => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
    const y = v => H - M.bottom - (v - y0) / (y1 - y0) * (H - M.top - M.bottom);
    axes(svg, x, y, niceTicks(x0, x1, 6), niceTicks(y0, y1, 5), o.xLabel, o.yLabel);
    series.forEach((s, i) => {
      const pts = s.points.filter(p => Number.isFinite(p[1]));
      if (!pts.length) return;
      const color = s.color || PALETTE[i % PALETTE.length];
      el("polyline", { points: thin(pts, 300).map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 2, class: "series", "data-series": s.name, "data-n": pts.length }, svg);
      if (pts.length <= 60 || s.markers) {
        for (const p of pts) {
          const dot = el("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: color }, svg);
          el("title", {}, dot).textContent = `${s.name}: ${fmt(p[1])} at ${fmt(p[0])}`;
        }
      }
    });
    legend(svg, series.map((s, i) => ({ name: s.name, color: s.color || PALETTE[i % PALETTE.length] })));
  }

  /** Grouped bars: categories (labels) × series [{name, color, values}]; options: yMax, yLabel. */
  function bars(container, title, categories, series, options) {
    const o = options || {};
    const svg = frame(container, title);
    if (!categories.length) return empty(svg, o.empty);
    const values = series.flatMap(s => s.values.filter(Number.isFinite));
    const y1 = o.yMax !== undefined ? Math.max(o.yMax, ...values) : Math.max(...values, 1e-9);
    const y = v => H - M.bottom - v / y1 * (H - M.top - M.bottom);
    const slot = (W - M.left - M.right) / categories.length;
    const barW = Math.max(1, slot * 0.8 / series.length);
    axes(svg, () => 0, y, [], niceTicks(0, y1, 5), o.xLabel, o.yLabel);
    series.forEach((s, si) => {
      const color = s.color || PALETTE[si % PALETTE.length];
      s.values.forEach((v, ci) => {
        if (!Number.isFinite(v)) return;
        const bx = M.left + ci * slot + slot * 0.1 + si * barW;
        const rect = el("rect", { x: bx.toFixed(2), y: y(v).toFixed(2), width: barW.toFixed(2),
          height: Math.max(0, y(0) - y(v)).toFixed(2), fill: color, class: "bar", "data-series": s.name }, svg);
        el("title", {}, rect).textContent = `${categories[ci]} — ${s.name}: ${fmt(v)}`;
      });
    });
    const every = Math.ceil(categories.length / 24);  // at most ~24 labels, rotated
    categories.forEach((c, ci) => {
      if (ci % every) return;
      const cx = M.left + ci * slot + slot / 2;
      const short = c.length > 14 ? "…" + c.slice(-13) : c;
      text(svg, cx, H - M.bottom + 12, short, { "text-anchor": "end", class: "tick-small",
        transform: `rotate(-30 ${cx} ${H - M.bottom + 12})` });
    });
    legend(svg, series.map((s, i) => ({ name: s.name, color: s.color || PALETTE[i % PALETTE.length] })));
  }

  /** points: [{x, y, label, group}]; one colour per group; options.frontier: [{x, y}] drawn as a step line. */
  function scatter(container, title, points, options) {
    const o = options || {};
    const svg = frame(container, title);
    if (!points.length) return empty(svg, o.empty);
    const [x0, x1] = extent(points.map(p => p.x), [o.xMin, o.xMax]);
    const [y0, y1] = extent(points.map(p => p.y), [o.yMin, o.yMax]);
    const x = v => M.left + 10 + (v - x0) / (x1 - x0) * (W - M.left - M.right - 20);
    const y = v => H - M.bottom - 10 - (v - y0) / (y1 - y0) * (H - M.top - M.bottom - 20);
    axes(svg, x, y, niceTicks(x0, x1, 6), niceTicks(y0, y1, 5), o.xLabel, o.yLabel, o.xFmt);
    const groups = [...new Set(points.map(p => p.group))];
    if (o.connect) {
      groups.forEach((g, gi) => {
        const pts = points.filter(p => p.group === g).sort((a, b) => a.x - b.x);
        if (pts.length > 1) el("polyline", { points: pts.map(p => `${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(" "),
          fill: "none", stroke: PALETTE[gi % PALETTE.length], "stroke-width": 1.5, opacity: 0.6 }, svg);
      });
    }
    if (o.frontier && o.frontier.length) {  // [{x, y}] by cost: a step line through the non-dominated points
      const f = [...o.frontier].sort((a, b) => a.x - b.x);
      const steps = f.flatMap((p, i) => (i ? [[x(p.x), y(f[i - 1].y)], [x(p.x), y(p.y)]] : [[x(p.x), y(p.y)]]));
      const line = el("polyline", { points: steps.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "),
        fill: "none", stroke: "#ea580c", "stroke-width": 2, "stroke-dasharray": "5 3", class: "frontier",
        "data-n": f.length }, svg);
      el("title", {}, line).textContent = "Pareto frontier";
    }
    for (const p of points) {
      const color = PALETTE[groups.indexOf(p.group) % PALETTE.length];
      const dot = el("circle", { cx: x(p.x), cy: y(p.y), r: 5, fill: color, class: "point" }, svg);
      el("title", {}, dot).textContent = `${p.label}: ${fmt(p.y)} at ${fmt(p.x)}`;
      text(svg, x(p.x) + 7, y(p.y) - 6, p.label, { class: "tick-small" });
    }
    legend(svg, groups.map((g, i) => ({ name: String(g), color: PALETTE[i % PALETTE.length] })));
  }

  return { line, bars, scatter, PALETTE, fmt };
})();
