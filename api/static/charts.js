// Small SVG charts (line, grouped bar, scatter): no library, no CDN, text set via textContent only.
// Each chart is drawn at its box's own pixel width (the viewBox is the box, so text stays at its real size
// on a wide screen) and redrawn when the window is resized; point labels are placed where they overlap
// neither each other nor the points, and a label that fits nowhere is left to the point's tooltip.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const CHAR_W = { legend: 6.5, label: 5.4, title: 7.4 };  // average glyph widths (px) of the three text sizes
  const LABEL_H = 11;
  const drawn = new Map();  // container → how to draw it again (window resizes)

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

  /** Legend items laid out right to left beside the title, wrapping to more rows when they would reach it. */
  function legendRows(items, W, titleWidth) {
    const rows = [[]];
    let x = W - 16;
    for (const item of [...items].reverse()) {
      const width = Math.max(30, item.name.length * CHAR_W.legend) + 24;
      const limit = rows.length === 1 ? 58 + titleWidth + 12 : 58;
      if (x - width < limit && rows[rows.length - 1].length) { rows.push([]); x = W - 16; }
      rows[rows.length - 1].push({ ...item, x });
      x -= width;
    }
    return rows.filter(r => r.length);
  }

  /** A fresh SVG as wide as the container; returns the drawing's size and margins (room for the legend). */
  function frame(container, title, legendItems, redraw) {
    for (const old of [...drawn.keys()]) if (!old.isConnected) drawn.delete(old);  // views that are gone
    drawn.set(container, redraw);
    container.replaceChildren();
    const W = Math.max(320, Math.round((container.clientWidth || 648) - 8));
    const H = Math.round(Math.min(360, Math.max(240, W * 0.42)));
    const rows = legendRows(legendItems || [], W, (title || "").length * CHAR_W.title);
    const M = { top: 26 + 14 * Math.max(0, rows.length - 1), right: 16, bottom: 44, left: 58 };
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart", role: "img" }, container);
    if (title) {
      svg.setAttribute("aria-label", title);
      text(svg, M.left, 16, title, { class: "chart-title" });
    }
    rows.forEach((row, r) => row.forEach(item => {
      const width = Math.max(30, item.name.length * CHAR_W.legend);
      text(svg, item.x, 16 + 14 * r, item.name, { "text-anchor": "end", class: "legend" });
      el("rect", { x: item.x - width - 14, y: 8 + 14 * r, width: 10, height: 10, fill: item.color }, svg);
    }));
    return { svg, W, H, M };
  }

  function empty(f, message) {
    text(f.svg, f.W / 2, f.H / 2, message || "no data yet", { class: "chart-empty", "text-anchor": "middle" });
  }

  function axes(f, x, y, xTicks, yTicks, xLabel, yLabel, xFmt) {
    const { svg, W, H, M } = f;
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

  const overlaps = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;

  /**
   * Where each label goes: for points [{px, py, label}] (pixels) inside `area` ({x, y, w, h}), the first of
   * eight spots around its point whose box overlaps no label placed before it and no point; null where none
   * fits. Pure (no DOM), so the rule is the same wherever it runs.
   */
  function placeLabels(points, area, radius) {
    const r = radius || 5;
    const dots = points.map(p => ({ x: p.px - r, y: p.py - r, w: 2 * r, h: 2 * r }));
    const placed = [];
    return points.map(p => {
      const w = p.label.length * CHAR_W.label, h = LABEL_H, gap = r + 2;
      const spots = [  // [box left, box top, text x, anchor]
        [p.px + gap, p.py - h - 1, p.px + gap, "start"], [p.px + gap, p.py + 1, p.px + gap, "start"],
        [p.px - gap - w, p.py - h - 1, p.px - gap, "end"], [p.px - gap - w, p.py + 1, p.px - gap, "end"],
        [p.px - w / 2, p.py - gap - h, p.px, "middle"], [p.px - w / 2, p.py + gap, p.px, "middle"],
        [p.px + gap, p.py - h / 2, p.px + gap, "start"], [p.px - gap - w, p.py - h / 2, p.px - gap, "end"]];
      for (const [bx, by, tx, anchor] of spots) {
        const box = { x: bx, y: by, w, h };
        const inside = bx >= area.x && by >= area.y && bx + w <= area.x + area.w && by + h <= area.y + area.h;
        if (inside && !placed.some(b => overlaps(b, box)) && !dots.some(d => overlaps(d, box))) {
          placed.push(box);
          return { x: tx, y: by + h - 2, anchor, box };
        }
      }
      return null;
    });
  }

  /** series: [{name, color, points: [[x, y], ...]}]; options: xLabel, yLabel, yMin, yMax. */
  function line(container, title, series, options) {
    const o = options || {};
    const colored = series.map((s, i) => ({ ...s, color: s.color || PALETTE[i % PALETTE.length] }));
    const f = frame(container, title, colored.map(s => ({ name: s.name, color: s.color })),
      () => line(container, title, series, options));
    const { svg, W, H, M } = f;
    const all = series.flatMap(s => s.points.filter(p => Number.isFinite(p[1])));
    if (!all.length) return empty(f, o.empty);
    const [x0, x1] = extent(all.map(p => p[0]));
    const [y0, y1] = extent(all.map(p => p[1]), [o.yMin, o.yMax]);
    const x = v => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
    const y = v => H - M.bottom - (v - y0) / (y1 - y0) * (H - M.top - M.bottom);
    axes(f, x, y, niceTicks(x0, x1, Math.round(W / 110)), niceTicks(y0, y1, 5), o.xLabel, o.yLabel);
    colored.forEach(s => {
      const pts = s.points.filter(p => Number.isFinite(p[1]));
      if (!pts.length) return;
      el("polyline", { points: thin(pts, 300).map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: s.color, "stroke-width": 2, class: "series", "data-series": s.name, "data-n": pts.length }, svg);
      if (pts.length <= 60 || s.markers) {
        for (const p of pts) {
          const dot = el("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: s.color }, svg);
          el("title", {}, dot).textContent = `${s.name}: ${fmt(p[1])} at ${fmt(p[0])}`;
        }
      }
    });
  }

  /** Grouped bars: categories (labels) × series [{name, color, values}]; options: yMax, yLabel. */
  function bars(container, title, categories, series, options) {
    const o = options || {};
    const colored = series.map((s, i) => ({ ...s, color: s.color || PALETTE[i % PALETTE.length] }));
    const f = frame(container, title, colored.map(s => ({ name: s.name, color: s.color })),
      () => bars(container, title, categories, series, options));
    const { svg, W, H, M } = f;
    if (!categories.length) return empty(f, o.empty);
    const values = series.flatMap(s => s.values.filter(Number.isFinite));
    const y1 = o.yMax !== undefined ? Math.max(o.yMax, ...values) : Math.max(...values, 1e-9);
    const y = v => H - M.bottom - v / y1 * (H - M.top - M.bottom);
    const slot = (W - M.left - M.right) / categories.length;
    const barW = Math.max(1, slot * 0.8 / series.length);
    axes(f, () => 0, y, [], niceTicks(0, y1, 5), o.xLabel, o.yLabel);
    colored.forEach((s, si) => {
      s.values.forEach((v, ci) => {
        if (!Number.isFinite(v)) return;
        const bx = M.left + ci * slot + slot * 0.1 + si * barW;
        const rect = el("rect", { x: bx.toFixed(2), y: y(v).toFixed(2), width: barW.toFixed(2),
          height: Math.max(0, y(0) - y(v)).toFixed(2), fill: s.color, class: "bar", "data-series": s.name }, svg);
        el("title", {}, rect).textContent = `${categories[ci]} — ${s.name}: ${fmt(v)}`;
      });
    });
    const every = Math.ceil(categories.length / Math.max(8, Math.floor(W / 26)));  // rotated labels ~26 px apart
    categories.forEach((c, ci) => {
      if (ci % every) return;
      const cx = M.left + ci * slot + slot / 2;
      const short = c.length > 14 ? "…" + c.slice(-13) : c;
      text(svg, cx, H - M.bottom + 12, short, { "text-anchor": "end", class: "tick-small",
        transform: `rotate(-30 ${cx} ${H - M.bottom + 12})` });
    });
  }

  /**
   * points: [{x, y, label, group}]; one colour per group. options.connect: a line through each group's points
   * by x; options.frontier: [{x, y}] drawn as a step line.
   */
  function scatter(container, title, points, options) {
    const o = options || {};
    const groups = [...new Set(points.map(p => p.group))];
    const color = g => PALETTE[groups.indexOf(g) % PALETTE.length];
    const f = frame(container, title, groups.map(g => ({ name: String(g), color: color(g) })),
      () => scatter(container, title, points, options));
    const { svg, W, H, M } = f;
    if (!points.length) return empty(f, o.empty);
    const [x0, x1] = extent(points.map(p => p.x), [o.xMin, o.xMax]);
    const [y0, y1] = extent(points.map(p => p.y), [o.yMin, o.yMax]);
    const x = v => M.left + 10 + (v - x0) / (x1 - x0) * (W - M.left - M.right - 20);
    const y = v => H - M.bottom - 10 - (v - y0) / (y1 - y0) * (H - M.top - M.bottom - 20);
    axes(f, x, y, niceTicks(x0, x1, Math.round(W / 110)), niceTicks(y0, y1, 5), o.xLabel, o.yLabel, o.xFmt);
    if (o.connect) {
      groups.forEach(g => {
        const pts = points.filter(p => p.group === g).sort((a, b) => a.x - b.x);
        if (pts.length > 1) el("polyline", { points: pts.map(p => `${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(" "),
          fill: "none", stroke: color(g), "stroke-width": 1.5, opacity: 0.6, class: "group-line", "data-group": g }, svg);
      });
    }
    if (o.frontier && o.frontier.length) {  // [{x, y}] by cost: a step line through the non-dominated points
      const fr = [...o.frontier].sort((a, b) => a.x - b.x);
      const steps = fr.flatMap((p, i) => (i ? [[x(p.x), y(fr[i - 1].y)], [x(p.x), y(p.y)]] : [[x(p.x), y(p.y)]]));
      const front = el("polyline", { points: steps.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "),
        fill: "none", stroke: "#ea580c", "stroke-width": 2, "stroke-dasharray": "5 3", class: "frontier",
        "data-n": fr.length }, svg);
      el("title", {}, front).textContent = "Pareto frontier";
    }
    const px = points.map(p => ({ px: x(p.x), py: y(p.y), label: p.label }));
    const spots = placeLabels(px, { x: M.left + 1, y: M.top, w: W - M.left - M.right - 1, h: H - M.top - M.bottom - 1 }, 5);
    points.forEach((p, i) => {
      const dot = el("circle", { cx: px[i].px, cy: px[i].py, r: 5, fill: color(p.group), class: "point" }, svg);
      el("title", {}, dot).textContent = `${p.label} (${p.group}): ${fmt(p.y)} at ${fmt(p.x)}`;
      if (spots[i]) text(svg, spots[i].x, spots[i].y, p.label, { class: "tick-small point-label", "text-anchor": spots[i].anchor });
    });
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const [container, redraw] of [...drawn]) {
        if (!container.isConnected) drawn.delete(container);
        else redraw();
      }
    }, 150);
  });

  return { line, bars, scatter, placeLabels, PALETTE, fmt };
})();
