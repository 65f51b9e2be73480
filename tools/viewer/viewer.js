// lowbit view: the page's code. Vanilla JS, no network. Data: the JSON in #lowbit-data (see graph_data.py).
// Items: node i is item i, group g is item N + g. Python ranked the children of every group; here we turn
// ranks into coordinates for what is expanded, and draw only what is in (or near) the viewport.
"use strict";
(() => {
  const started = performance.now();
  const DATA = JSON.parse(document.getElementById("lowbit-data").textContent);
  for (const pane of DATA.panes) {
    for (const n of pane.nodes) {
      if (n.quant != null) n.quant = pane.quant[n.quant]; // shared by a DequantizeLinear and its consumers
      if (n.path == null) n.path = pane.groups[n.group].id;
    }
  }
  const parsed = performance.now();
  const NODE_W = 172, NODE_H = 50, GROUP_W = 212, GROUP_H = DATA.diff ? 70 : 58; // a 4th line for changes
  const GAP_X = 22, GAP_Y = 34, PAD = 14, HEADER = 24;
  const EXPAND_BUDGET = 120, AUTO_SIBLINGS = 12; // see Pane.autoExpand
  const CHAR_W = 6.1; // average glyph width at 10-11px, to shorten labels
  const DIFF_CLASS = { added: "d-added", removed: "d-removed", rewritten: "d-rewritten" };
  const BITS_COLORS = { 2: "#d64541", 3: "#f08a3c", 4: "#f2c94c", 8: "#5fb878", float: "#f1f1f1", mixed: "#b48ee0" };
  const AXIS_COLORS = { oc: "#6fa8dc", ic: "#f6a04d", tensor: "#b7b7b7", float: "#f1f1f1", mixed: "#b48ee0" };
  const OP_COLORS = {
    weight: ["#cfe3f7", "MatMul, Gemm, Conv"], quant: ["#e6d5f5", "(De)QuantizeLinear, custom ops"],
    norm: ["#d8efd3", "normalisation, Softmax"], math: ["#f7ecc8", "elementwise"],
    shape: ["#ececec", "shape, layout, constants"], io: ["#ffffff", "graph input / output"], other: ["#f4f0fa", "other"],
  };
  const OP_CATEGORY = {};
  for (const [category, ops] of Object.entries({
    weight: "MatMul Gemm Conv ConvTranspose MatMulInteger MatMulNBits",
    quant: "DequantizeLinear QuantizeLinear DynamicQuantizeLinear",
    norm: "LayerNormalization SimplifiedLayerNormalization RMSNormalization BatchNormalization Softmax ReduceMean Pow Sqrt Reciprocal",
    math: "Add Sub Mul Div Neg Sigmoid Tanh Relu Gelu Erf Exp Log Where Max Min Abs Cos Sin IsNaN Not And Equal Less Greater CumSum",
    shape: "Shape Reshape Transpose Slice Concat Unsqueeze Squeeze Expand Gather GatherND Range Cast Constant ConstantOfShape Split Identity Flatten",
    io: "Input Output",
  })) for (const op of ops.split(" ")) OP_CATEGORY[op] = category;

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const head = (s, width) => { const n = Math.floor(width / CHAR_W); return s.length > n ? s.slice(0, n - 1) + "…" : s; };
  const tail = (s, width) => { const n = Math.floor(width / CHAR_W); return s.length > n ? "…" + s.slice(s.length - n + 1) : s; };
  const fmtBytes = (b) => b == null ? "" : b >= 2 ** 20 ? (b / 2 ** 20).toFixed(2) + " MiB" : b >= 1024 ? (b / 1024).toFixed(1) + " KiB" : b + " B";
  const fmtNum = (x) => x == null ? "" : Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(3) : +x.toFixed(4) + "";
  const $ = (id) => document.getElementById(id);

  // ---- colours ---------------------------------------------------------------------------------------
  const errors = [];
  for (const pane of DATA.panes) for (const n of pane.nodes) if (n.quant && n.quant.relative_error != null && n.op === "DequantizeLinear") errors.push(n.quant.relative_error);
  const errorRange = errors.length ? [Math.min(...errors), Math.max(...errors)] : null;
  const RAMP = [[0, [120, 200, 140]], [0.5, [245, 215, 110]], [1, [236, 120, 110]]]; // light enough for dark text
  function errorColor(e) {
    const [lo, hi] = errorRange;
    const t = hi > lo ? Math.min(1, Math.max(0, (e - lo) / (hi - lo))) : 0.5;
    const i = t <= 0.5 ? 0 : 1, u = (t - RAMP[i][0]) / 0.5;
    return "rgb(" + RAMP[i][1].map((c, k) => Math.round(c + (RAMP[i + 1][1][k] - c) * u)).join(",") + ")";
  }
  const MODES = {
    error: { label: "relative error", available: !!errorRange },
    bits: { label: "bits", available: DATA.panes.some((p) => p.nodes.some((n) => n.quant)) },
    axis: { label: "group axis", available: DATA.panes.some((p) => p.nodes.some((n) => n.quant)) },
    op: { label: "op type", available: true },
  };
  let mode = Object.keys(MODES).find((m) => MODES[m].available);

  function nodeFill(n) {
    if (mode === "op") return OP_COLORS[OP_CATEGORY[n.op] || (n.domain ? "quant" : "other")][0];
    if (!n.quant) return n.op === "Input" || n.op === "Output" ? "#ffffff" : "#f1f1f1";
    if (mode === "error") return n.quant.relative_error != null ? errorColor(n.quant.relative_error) : "#dddddd";
    return mode === "bits" ? BITS_COLORS[n.quant.bits] || BITS_COLORS.mixed : AXIS_COLORS[n.quant.axis] || AXIS_COLORS.mixed;
  }
  function groupFill(g) {
    const q = g.quant;
    if (mode === "op" || !q) return "#eef2f7";
    if (mode === "error") return q.maxError != null ? errorColor(q.maxError) : "#dddddd";
    const values = mode === "bits" ? q.bits : q.axes, colors = mode === "bits" ? BITS_COLORS : AXIS_COLORS;
    return values.length === 1 ? colors[values[0]] || colors.mixed : colors.mixed;
  }
  const adadimText = (q) => q.adadim_choice + (q.axis_errors && Object.keys(q.axis_errors).length ?
    " (output error " + Object.entries(q.axis_errors).map(([axis, e]) => `${axis} ${fmtNum(e)}`).join(", ") + ")" : "");
  // Under a size budget: each candidate width's error (end to end where measured, else trace(dW^T H dW)) and bytes.
  const widthText = (q) => q.width_options ? Object.entries(q.width_options).map(([bits, o]) =>
    `${+bits === q.bits ? "[" : ""}${bits}b ${fmtNum(o.sensitivity ?? o.error)} ${fmtBytes(o.bytes)}${+bits === q.bits ? "]" : ""}`).join(" · ") : "";
  const quantBadge = (q) => q ? `${q.bits}b g${q.group_size} ${q.axis}` + (q.adadim_choice ? ` AdaDim:${q.adadim_choice}` : "") +
    (q.relative_error != null ? ` · err ${q.relative_error.toFixed(4)}` : "") : "";

  // ---- one graph pane --------------------------------------------------------------------------------
  class Pane {
    constructor(app, model, number, host) {
      Object.assign(this, { app, model, number });
      const N = (this.N = model.nodes.length), G = model.groups.length, M = N + G;
      this.groups = model.groups;
      this.expanded = new Uint8Array(G);
      this.expanded[0] = 1;
      for (const k of ["relX", "relY", "absX", "absY", "w", "h"]) this[k] = new Float64Array(M);
      this.visible = [];
      this.selected = -1;
      this.hits = new Set();
      this.groupHits = new Int32Array(G);
      this.view = { x: 20, y: 20, k: 1 };
      this.groupById = new Map(this.groups.map((g, i) => [g.id, i]));
      this.nodeByKey = new Map(model.nodes.map((n, i) => [Pane.key(n), i]));
      const sources = [], targets = [];
      model.nodes.forEach((n, i) => { for (const v of n.inputs) { const p = v >= 0 ? model.values[v][3] : -1; if (p >= 0) { sources.push(p); targets.push(i); } } });
      this.edgeSrc = Int32Array.from(sources);
      this.edgeDst = Int32Array.from(targets);
      this.consumers = null; // built on first use by the details panel
      host.innerHTML = `<div class="pane-title">${esc(model.title)}</div><svg class="graph"><g class="viewport"></g></svg>`;
      this.svg = host.querySelector("svg");
      this.viewport = host.querySelector("g.viewport");
      this.bindEvents();
    }
    static key(n) { return (n.op === "Input" ? "input:" : n.op === "Output" ? "output:" : "node:") + n.name; }
    group(item) { return this.groups[item - this.N]; }

    // First view: expand the largest visible group while the boxes fit the budget; stop at the first
    // that does not fit, or that is one of a long list of siblings (30 layers stay 30 boxes). Runs of
    // a module's own ops (a mask computation, say) stay closed.
    autoExpand(budget) {
      const { N, groups } = this;
      const groupChildren = (g) => groups[g].children.filter((c) => c >= N && groups[c - N].kind !== "ops").map((c) => c - N);
      let count = groups[0].children.length;
      const candidates = groupChildren(0);
      while (candidates.length) {
        let best = 0;
        for (let i = 1; i < candidates.length; i++) if (groups[candidates[i]].nodes > groups[candidates[best]].nodes) best = i;
        const g = candidates.splice(best, 1)[0], more = groups[g].children.length - 1;
        if (count + more > budget || groupChildren(groups[g].parent).length > AUTO_SIBLINGS) break;
        this.expanded[g] = 1;
        count += more;
        candidates.push(...groupChildren(g));
      }
    }

    // Sizes and positions of everything expanded, then which box stands for each node, then the edges.
    layout() {
      const { N, groups, expanded, relX, relY, absX, absY, w, h } = this;
      const measure = (g) => {
        const { children, ranks } = groups[g];
        for (const c of children) {
          if (c >= N && expanded[c - N]) measure(c - N);
          else { w[c] = c >= N ? GROUP_W : NODE_W; h[c] = c >= N ? GROUP_H : NODE_H; }
        }
        const rows = [];
        for (let i = 0, start = 0; i <= children.length; i++) {
          if (i === children.length || ranks[i] !== ranks[start]) { rows.push([start, i]); start = i; }
        }
        let inner = g ? groups[g].name.length * CHAR_W + 90 : 0;
        const rowWidth = rows.map(([a, b]) => { let s = GAP_X * (b - a - 1); for (let i = a; i < b; i++) s += w[children[i]]; inner = Math.max(inner, s); return s; });
        let y = (g ? HEADER : 0) + PAD;
        rows.forEach(([a, b], r) => {
          let x = PAD + (inner - rowWidth[r]) / 2, rowHeight = 0;
          for (let i = a; i < b; i++) { const c = children[i]; relX[c] = x; relY[c] = y; x += w[c] + GAP_X; rowHeight = Math.max(rowHeight, h[c]); }
          y += rowHeight + GAP_Y;
        });
        w[N + g] = inner + 2 * PAD;
        h[N + g] = y - GAP_Y + PAD;
      };
      measure(0);
      this.visible = [];
      const place = (g) => {
        for (const c of groups[g].children) {
          absX[c] = absX[N + g] + relX[c];
          absY[c] = absY[N + g] + relY[c];
          this.visible.push(c);
          if (c >= N && expanded[c - N]) place(c - N);
        }
      };
      place(0);
      // The box each node is drawn in: itself, or its outermost collapsed ancestor.
      const groupBox = new Int32Array(groups.length).fill(-1), order = [0];
      for (let i = 0; i < order.length; i++) {
        const g = order[i];
        for (const c of groups[g].children) {
          if (c < N) continue;
          groupBox[c - N] = groupBox[g] >= 0 ? groupBox[g] : expanded[c - N] ? -1 : c;
          order.push(c - N);
        }
      }
      const box = (n) => { const b = groupBox[this.model.nodes[n].group]; return b >= 0 ? b : n; };
      const seen = new Map();
      this.edges = [];
      for (let e = 0; e < this.edgeSrc.length; e++) {
        const a = box(this.edgeSrc[e]), b = box(this.edgeDst[e]);
        if (a === b) continue;
        const key = a * (N + groups.length) + b;
        if (!seen.has(key)) { seen.set(key, this.edges.length); this.edges.push([a, b]); }
      }
      this.box = box;
    }

    fit() {
      const W = this.svg.clientWidth || 800, root = this.N;
      const k = Math.max(0.35, Math.min(1, (W - 40) / this.w[root]));
      this.view = { k, x: Math.max(20, (W - this.w[root] * k) / 2), y: 16 };
    }

    // Graph-space rectangle on screen, grown by `margin` screens on each side.
    viewRect(margin) {
      const { x, y, k } = this.view, W = this.svg.clientWidth || 800, H = this.svg.clientHeight || 600;
      return [(-x - margin * W) / k, (-y - margin * H) / k, (W - x + margin * W) / k, (H - y + margin * H) / k];
    }

    render() {
      const { N, absX, absY, w, h, expanded } = this;
      const r = (this.rendered = this.viewRect(0.6));
      const inside = (x0, y0, x1, y1) => x1 >= r[0] && x0 <= r[2] && y1 >= r[1] && y0 <= r[3];
      let frames = "", boxes = "";
      for (const c of this.visible) {
        if (!inside(absX[c], absY[c], absX[c] + w[c], absY[c] + h[c])) continue;
        if (c >= N && expanded[c - N]) frames += this.frameSvg(c);
        else boxes += c >= N ? this.groupSvg(c) : this.nodeSvg(c);
      }
      let edges = "", back = "", hot = "", arrows = "";
      const sel = this.selected >= 0 ? (this.selected < N ? this.box(this.selected) : this.selected) : -1;
      for (const [a, b] of this.edges) {
        const x1 = absX[a] + w[a] / 2, y1 = absY[a] + h[a], x2 = absX[b] + w[b] / 2, y2 = absY[b];
        if (!inside(Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2))) continue;
        const d = Math.max(24, Math.abs(y2 - y1) / 2);
        const path = `M${x1.toFixed(1)} ${y1.toFixed(1)}C${x1.toFixed(1)} ${(y1 + d).toFixed(1)} ${x2.toFixed(1)} ${(y2 - d).toFixed(1)} ${x2.toFixed(1)} ${y2.toFixed(1)}`;
        if (a === sel || b === sel) hot += path;
        else if (y2 < y1) back += path;
        else edges += path;
        arrows += `M${(x2 - 4).toFixed(1)} ${(y2 - 7).toFixed(1)}L${(x2 + 4).toFixed(1)} ${(y2 - 7).toFixed(1)}L${x2.toFixed(1)} ${y2.toFixed(1)}Z`;
      }
      this.viewport.innerHTML = `<g class="frames">${frames}</g><path class="edges" d="${edges}"/><path class="edges back" d="${back}"/>` +
        `<path class="edges hot" d="${hot}"/><path class="arrows" d="${arrows}"/><g class="boxes">${boxes}</g>`;
      this.applyTransform(false);
    }

    classes(item, diff) {
      let s = item === this.selected ? " sel" : "";
      if (this.hits.has(item) || (item >= this.N && this.groupHits[item - this.N] > 0)) s += " hit";
      return s + (diff ? " " + DIFF_CLASS[diff] : "");
    }
    nodeSvg(i) {
      const n = this.model.nodes[i], x = this.absX[i], y = this.absY[i];
      const title = n.op === "Input" || n.op === "Output" ? n.op : (n.domain ? n.domain + "::" : "") + n.op;
      const third = n.quant ? quantBadge(n.quant) : n.diff ? n.diff : "";
      return `<g class="node${this.classes(i, n.diff)}" data-i="${i}" transform="translate(${x.toFixed(1)},${y.toFixed(1)})">` +
        `<rect width="${NODE_W}" height="${NODE_H}" rx="6" style="fill:${nodeFill(n)}"/>` +
        `<text class="t1" x="8" y="16">${esc(head(title, NODE_W - 12))}</text>` +
        `<text class="t2" x="8" y="30">${esc(tail(n.name, NODE_W - 14))}</text>` +
        (third ? `<text class="t3" x="8" y="43">${esc(head(third, NODE_W - 14))}</text>` : "") + `</g>`;
    }
    groupSvg(item) {
      const g = this.group(item), x = this.absX[item], y = this.absY[item];
      const hits = this.groupHits[item - this.N];
      const ops = g.ops.map(([op, c]) => `${op}×${c}`).join(" ");
      const third = g.quant ? `${g.quant.count} quantized · ${g.quant.bits.join("/")}b ${g.quant.axes.join("/")}` +
        (g.quant.maxError != null ? ` · max ${g.quant.maxError.toFixed(3)}` : "") : "";
      const changes = g.diff ? Object.entries(g.diff).map(([s, c]) => `${c} ${s}`).join(", ") : "";
      const diff = g.diff ? (g.diff.rewritten || (g.diff.added && g.diff.removed) ? "rewritten" : g.diff.added ? "added" : "removed") : null;
      return `<g class="grp${this.classes(item, diff)}" data-i="${item}" transform="translate(${x.toFixed(1)},${y.toFixed(1)})">` +
        `<rect class="shadow" x="4" y="4" width="${GROUP_W}" height="${GROUP_H}" rx="7"/>` +
        `<rect class="body" width="${GROUP_W}" height="${GROUP_H}" rx="7" style="fill:${groupFill(g)}"/>` +
        `<text class="t1" x="9" y="16">▸ ${esc(tail(g.name, GROUP_W - 30))}</text>` +
        `<text class="t2" x="9" y="31">${esc(head(`${g.nodes} nodes${hits ? ` · ${hits} match` : ""} · ${ops}`, GROUP_W - 14))}</text>` +
        (third ? `<text class="t3" x="9" y="46">${esc(head(third, GROUP_W - 14))}</text>` : "") +
        (changes ? `<text class="t3 diff" x="9" y="${third ? 60 : 46}">${esc(head(changes, GROUP_W - 14))}</text>` : "") + `</g>`;
    }
    frameSvg(item) {
      const g = this.group(item), x = this.absX[item], y = this.absY[item], W = this.w[item], H = this.h[item];
      return `<g class="frame" transform="translate(${x.toFixed(1)},${y.toFixed(1)})"><rect class="fbody" width="${W}" height="${H}" rx="8"/>` +
        `<g class="fhead${item === this.selected ? " sel" : ""}" data-i="${item}"><rect width="${W}" height="${HEADER}" rx="8"/>` +
        `<text x="9" y="16">▾ ${esc(g.name)} (${g.nodes} nodes)</text></g></g>`;
    }

    applyTransform(maybeRender = true) {
      const { x, y, k } = this.view;
      this.viewport.setAttribute("transform", `translate(${x.toFixed(2)},${y.toFixed(2)}) scale(${k.toFixed(4)})`);
      this.svg.classList.toggle("lod-low", k < 0.45);
      this.svg.classList.toggle("lod-min", k < 0.2);
      if (!maybeRender || !this.rendered) return;
      const v = this.viewRect(0), r = this.rendered;
      if (v[0] < r[0] || v[1] < r[1] || v[2] > r[2] || v[3] > r[3]) this.scheduleRender();
    }
    scheduleRender() {
      if (this.pending) return;
      this.pending = requestAnimationFrame(() => { this.pending = 0; this.render(); });
    }

    bindEvents() {
      const svg = this.svg;
      let drag = null;
      svg.addEventListener("pointerdown", (e) => {
        if (e.button !== 0) return;
        drag = { x: e.clientX, y: e.clientY, vx: this.view.x, vy: this.view.y, moved: false, target: e.target.closest("[data-i]") };
        svg.setPointerCapture(e.pointerId);
      });
      svg.addEventListener("pointermove", (e) => {
        if (!drag) return;
        const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
        if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;
        drag.moved = true;
        svg.classList.add("dragging");
        this.view.x = drag.vx + dx;
        this.view.y = drag.vy + dy;
        this.applyTransform();
      });
      svg.addEventListener("pointerup", () => {
        if (drag && !drag.moved && drag.target) this.clickItem(+drag.target.dataset.i);
        drag = null;
        svg.classList.remove("dragging");
      });
      svg.addEventListener("wheel", (e) => {
        e.preventDefault();
        const box = svg.getBoundingClientRect(), mx = e.clientX - box.left, my = e.clientY - box.top;
        const k = Math.min(3, Math.max(0.03, this.view.k * Math.exp(-e.deltaY * 0.0015)));
        this.view.x = mx - ((mx - this.view.x) * k) / this.view.k;
        this.view.y = my - ((my - this.view.y) * k) / this.view.k;
        this.view.k = k;
        this.applyTransform();
      }, { passive: false });
    }

    clickItem(item) {
      if (item >= this.N) this.app.toggleGroup(this, item - this.N);
      this.app.select(this, item);
    }

    // Expand or collapse, keeping the clicked box where it was on screen.
    setExpanded(g, open) {
      const item = this.N + g, sx = this.absX[item] * this.view.k + this.view.x, sy = this.absY[item] * this.view.k + this.view.y;
      this.expanded[g] = open ? 1 : 0;
      this.layout();
      this.view.x = sx - this.absX[item] * this.view.k;
      this.view.y = sy - this.absY[item] * this.view.k;
      this.render();
    }

    // Expand every group above `item` (and `item` itself with `open`); true when something changed.
    reveal(item, open = false) {
      let g = item < this.N ? this.model.nodes[item].group : open ? item - this.N : this.groups[item - this.N].parent, changed = false;
      for (; g >= 0; g = this.groups[g].parent) if (!this.expanded[g]) { this.expanded[g] = 1; changed = true; }
      if (changed) this.layout();
      return changed;
    }
    centerOn(item) {
      const W = this.svg.clientWidth || 800, H = this.svg.clientHeight || 600;
      this.view.k = Math.max(this.view.k, 0.6);
      this.view.x = W / 2 - (this.absX[item] + this.w[item] / 2) * this.view.k;
      this.view.y = H / 3 - (this.absY[item] + Math.min(this.h[item], 200) / 2) * this.view.k;
      this.render();
    }
    counterpart(other, item) {
      if (item < other.N) return this.nodeByKey.get(Pane.key(other.model.nodes[item])) ?? -1;
      const g = this.groupById.get(other.group(item).id);
      return g == null ? -1 : this.N + g;
    }
    // The item here for the innermost group around `item` of pane `other` that this pane also has.
    closestGroup(other, item) {
      let g = item < other.N ? other.model.nodes[item].group : other.group(item).parent;
      for (; g > 0; g = other.groups[g].parent) {
        const mine = this.groupById.get(other.groups[g].id);
        if (mine != null) return this.N + mine;
      }
      return -1;
    }
    consumersOf(value) {
      if (!this.consumers) {
        this.consumers = new Map();
        this.model.nodes.forEach((n, i) => n.inputs.forEach((v) => { if (v >= 0) { if (!this.consumers.has(v)) this.consumers.set(v, []); this.consumers.get(v).push(i); } }));
      }
      return this.consumers.get(value) || [];
    }
  }

  // ---- the application: panes, search, details, tabs ---------------------------------------------
  class App {
    constructor() {
      document.title = DATA.title;
      $("title").textContent = DATA.subtitle;
      const host = $("panes");
      this.panes = DATA.panes.map((model, i) => {
        const div = document.createElement("div");
        div.className = "pane";
        host.appendChild(div);
        return new Pane(this, model, i, div);
      });
      this.main = this.panes[DATA.mainPane];
      for (const pane of this.panes) { pane.autoExpand(EXPAND_BUDGET); pane.layout(); pane.fit(); pane.render(); }
      this.buildControls();
      this.legend();
      $("details").insertAdjacentHTML("beforeend", this.panes.map((p) => this.modelInfo(p.model)).join(""));
      window.addEventListener("resize", () => this.panes.forEach((p) => p.render()));
    }

    buildControls() {
      const select = $("mode");
      select.innerHTML = Object.entries(MODES).filter(([, m]) => m.available).map(([k, m]) => `<option value="${k}">${m.label}</option>`).join("");
      select.value = mode;
      select.addEventListener("change", () => { mode = select.value; this.legend(); this.panes.forEach((p) => p.render()); });
      const tabs = [["graph", "Graph"], ["layers", "Layers"], ["plots", "Plots"]];
      if (DATA.diff) tabs.push(["changes", "Changes"]);
      $("tabs").innerHTML = tabs.map(([k, label]) => `<button data-tab="${k}">${label}</button>`).join("");
      $("tabs").addEventListener("click", (e) => { const t = e.target.closest("[data-tab]"); if (t) this.showTab(t.dataset.tab); });
      this.showTab("graph");
      const search = $("search");
      let timer = 0;
      search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => this.search(search.value), 120); });
      search.addEventListener("keydown", (e) => {
        if (e.key === "Enter") { clearTimeout(timer); if (search.value !== this.query) this.search(search.value); this.nextMatch(e.shiftKey ? -1 : 1); }
        if (e.key === "Escape") { search.value = ""; this.search(""); }
      });
      document.addEventListener("keydown", (e) => { if (e.key === "/" && document.activeElement !== search) { e.preventDefault(); search.focus(); } });
      $("collapse").addEventListener("click", () => this.panes.forEach((p) => { p.expanded.fill(0); p.expanded[0] = 1; p.autoExpand(EXPAND_BUDGET); p.layout(); p.fit(); p.render(); }));
      $("fit").addEventListener("click", () => this.panes.forEach((p) => { p.fit(); p.render(); }));
      $("details").addEventListener("click", (e) => {
        const link = e.target.closest("[data-node]");
        if (link) this.jump(this.panes[+link.dataset.pane], +link.dataset.node);
      });
    }

    showTab(name) {
      for (const b of $("tabs").children) b.classList.toggle("active", b.dataset.tab === name);
      for (const t of ["graph", "layers", "plots", "changes"]) $("tab-" + t).hidden = t !== name;
      this.built = this.built || {};
      if (!this.built[name]) {
        this.built[name] = true;
        if (name === "layers") this.layersTab();
        if (name === "plots") this.plotsTab();
        if (name === "changes") this.changesTab();
      }
      if (name === "graph") this.panes.forEach((p) => p.render());
    }

    toggleGroup(pane, g) {
      const open = !pane.expanded[g], id = pane.groups[g].id;
      pane.setExpanded(g, open);
      for (const other of this.panes) {
        const h = other === pane ? null : other.groupById.get(id);
        if (h != null && other.expanded[h] !== (open ? 1 : 0)) other.setExpanded(h, open);
      }
    }

    // Select in every pane: the same node or group, else (an added node) its closest common group.
    select(pane, item) {
      for (const p of this.panes) {
        const mine = p === pane ? item : p.counterpart(pane, item);
        p.selected = mine;
        const shown = p === pane ? -1 : mine >= 0 ? mine : p.closestGroup(pane, item);
        if (shown >= 0) { p.reveal(shown, mine < 0); p.centerOn(shown); } else p.render();
      }
      this.details(pane, item);
    }

    // Show a node in the graph tab: expand its groups, centre it, select it.
    jump(pane, item) {
      this.showTab("graph");
      pane.reveal(item);
      pane.centerOn(item);
      this.select(pane, item);
    }

    search(text) {
      this.query = text;
      const q = text.trim().toLowerCase();
      this.matches = [];
      for (const p of this.panes) {
        p.hits = new Set();
        p.groupHits.fill(0);
        if (q) {
          p.model.nodes.forEach((n, i) => {
            if (!n.name.toLowerCase().includes(q)) return;
            p.hits.add(i);
            for (let g = n.group; g > 0; g = p.groups[g].parent) p.groupHits[g]++;
            if (p === this.main) this.matches.push(i);
          });
          p.groups.forEach((g, i) => { if (i > 0 && g.id.toLowerCase().includes(q)) { p.hits.add(p.N + i); if (p === this.main) this.matches.push(p.N + i); } });
        }
        p.render();
      }
      this.matchIndex = -1;
      $("search-count").textContent = q ? `${this.matches.length} match${this.matches.length === 1 ? "" : "es"}` : "";
    }
    nextMatch(step) {
      if (!this.matches || !this.matches.length) return;
      this.matchIndex = (this.matchIndex + step + this.matches.length) % this.matches.length;
      this.jump(this.main, this.matches[this.matchIndex]);
      $("search-count").textContent = `${this.matchIndex + 1} / ${this.matches.length}`;
    }

    legend() {
      let html = "";
      if (mode === "error") html = `relative weight error <span>${fmtNum(errorRange[0])}</span><span class="ramp" style="background:linear-gradient(90deg,${errorColor(errorRange[0])},${errorColor((errorRange[0] + errorRange[1]) / 2)},${errorColor(errorRange[1])})"></span><span>${fmtNum(errorRange[1])}</span> <span class="sw" style="background:#f1f1f1"></span>float · groups: max of their weights`;
      else if (mode === "bits") html = "bits " + Object.entries(BITS_COLORS).map(([k, c]) => `<span class="sw" style="background:${c}"></span>${k}`).join("");
      else if (mode === "axis") html = "group axis " + Object.entries(AXIS_COLORS).map(([k, c]) => `<span class="sw" style="background:${c}"></span>${k}`).join("");
      else html = Object.values(OP_COLORS).map(([c, label]) => `<span class="sw" style="background:${c}"></span>${label}`).join("");
      if (DATA.diff) html += `<br>outline: <span class="sw" style="border:2px solid #1a9c3a"></span>added <span class="sw" style="border:2px dashed #d33"></span>removed <span class="sw" style="border:2px solid #e08a00"></span>rewritten`;
      $("legend").innerHTML = html;
    }

    // ---- details panel ----
    details(pane, item) {
      const el = $("details");
      const rows = (pairs) => `<table>${pairs.filter(([, v]) => v != null && v !== "").map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("")}</table>`;
      const link = (p, i, text) => `<span class="link" data-pane="${p.number}" data-node="${i}">${esc(text)}</span>`;
      let html = `<p class="hint">${esc(pane.model.title)}</p>`;
      if (item >= pane.N) {
        const g = pane.group(item);
        html += `<h3>${esc(g.name)}</h3>` + rows([["path", esc(g.id)], ["nodes", g.nodes], ["main ops", esc(g.ops.map(([o, c]) => `${o} ×${c}`).join(", "))],
          ["state", pane.expanded[item - pane.N] ? "expanded (click its header to collapse)" : "collapsed"]]);
        if (g.quant) html += `<h4>Quantized weights</h4>` + rows([["weights", g.quant.count], ["bits", g.quant.bits.join(", ")], ["group axis", g.quant.axes.join(", ")],
          ["bytes", fmtBytes(g.quant.bytes)], ["max error", fmtNum(g.quant.maxError)], ["mean error", fmtNum(g.quant.meanError)]]);
        if (g.diff) html += `<h4>Changes</h4>` + rows(Object.entries(g.diff));
        el.innerHTML = html;
        return;
      }
      const n = pane.model.nodes[item], values = pane.model.values;
      html += `<h3>${esc((n.domain ? n.domain + "::" : "") + n.op)}</h3>` + rows([["name", esc(n.name)], ["module", esc(n.path)], ["change", n.diff && esc(n.diff)]]);
      if (n.diffNote) html += `<div class="note">${esc(n.diffNote)}</div>`;
      if (n.quant) {
        const q = n.quant;
        html += `<h4>Quantized weight</h4>` + rows([["layer", esc(q.layer)], ["codes", esc(q.weight)], ["float weight", q.source_weight && esc(q.source_weight)],
          ["shape", esc(JSON.stringify(q.shape))], ["bits", q.bits], ["group size", q.group_size], ["group axis", q.axis], ["AdaDim choice", q.adadim_choice && esc(adadimText(q))], ["width options", q.width_options && esc(widthText(q))],
          ["symmetric", String(q.symmetric)], ["method", q.method && esc(q.method)], ["bytes", fmtBytes(q.bytes)], ["bytes before", fmtBytes(q.bytes_before)],
          ["relative error", fmtNum(q.relative_error)], ["output error", fmtNum(q.output_error)]]);
      }
      if (n.attributes) html += `<h4>Attributes</h4>` + rows(n.attributes.map(([k, v]) => [k, esc(v)]));
      const valueRows = (ids, kind) => ids.map((v, position) => {
        if (v < 0) return `<tr><td>${position}</td><td>(none)</td></tr>`;
        const [name, dtype, shape, producer, init] = values[v];
        let origin = "";
        if (kind === "input" && producer >= 0) origin = "from " + link(pane, producer, pane.model.nodes[producer].op + " " + pane.model.nodes[producer].name);
        if (kind === "output") origin = pane.consumersOf(v).slice(0, 8).map((c) => "to " + link(pane, c, pane.model.nodes[c].op + " " + pane.model.nodes[c].name)).join("<br>");
        let stats = "";
        if (init >= 0) stats = "<br>initializer, " + fmtBytes(pane.model.initializers[init].bytes) + this.statsHtml(pane.model.initializers[init].stats);
        return `<tr><td>${position}</td><td><b>${esc(name)}</b><br>${esc(dtype)} ${esc(shape)}${origin ? "<br>" + origin : ""}${stats}</td></tr>`;
      }).join("");
      html += `<h4>Inputs</h4><table>${valueRows(n.inputs, "input")}</table><h4>Outputs</h4><table>${valueRows(n.outputs, "output")}</table>`;
      el.innerHTML = html;
    }
    modelInfo(m) {
      const opsets = Object.entries(m.opset).map(([domain, version]) => `${domain} ${version}`).join(", ");
      const nodes = m.nodes.filter((n) => n.op !== "Input" && n.op !== "Output").length;
      return `<h4>${esc(m.title)}</h4><table>` + [["nodes", nodes], ["initializers", m.initializers.length],
        ["tensor bytes", fmtBytes(m.initializers.reduce((s, t) => s + t.bytes, 0))], ["opsets", esc(opsets)],
        ["IR version", m.irVersion], ["producer", esc(m.producer)]].filter(([, v]) => v !== "").map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("") + "</table>";
    }
    statsHtml(s) {
      if (!s || s.min == null) return "";
      const top = Math.max(...s.hist, 1), W = 224, H = 44, bw = W / s.hist.length;
      const bars = s.hist.map((c, i) => `<rect x="${(i * bw).toFixed(1)}" y="${(H - (H * c) / top).toFixed(1)}" width="${(bw - 1).toFixed(1)}" height="${((H * c) / top).toFixed(1)}" fill="#6f8fb5"/>`).join("");
      return `<br>min ${fmtNum(s.min)} · max ${fmtNum(s.max)}<br>mean ${fmtNum(s.mean)} · std ${fmtNum(s.std)}${s.nonfinite ? ` · <span class="warn">${s.nonfinite} non-finite</span>` : ""}` +
        `<br><svg class="hist" width="${W}" height="${H + 2}">${bars}</svg>`;
    }

    // ---- layers tab: summary, sortable table ----
    layersTab() {
      const el = $("tab-layers"), rows = DATA.layers.rows, pane = this.panes[DATA.layers.pane];
      const q = rows.filter((r) => r.status === "quantized");
      const unique = [...new Map(rows.map((r) => [r.weight, r])).values()]; // a tied table counts once
      const before = unique.reduce((s, r) => s + (r.bytes_before || 0), 0), after = unique.reduce((s, r) => s + (r.bytes_after || 0), 0);
      const errs = q.map((r) => r.relative_error).filter((e) => e != null);
      const card = (label, value) => `<div class="card">${label}<b>${value}</b></div>`;
      let html = `<div class="cards">${card("model", esc(pane.model.title))}${card("weight layers", rows.length)}${card("quantized", q.length)}` +
        card("weight bytes", `${fmtBytes(before)} → ${fmtBytes(after)}`) + (errs.length ? card("mean relative error", fmtNum(errs.reduce((a, b) => a + b, 0) / errs.length)) + card("max", fmtNum(Math.max(...errs))) : "") + "</div>";
      if (DATA.report) {
        html += `<p>Report <b>${esc(DATA.report.label)}</b>, recipe <code>${esc(JSON.stringify(DATA.report.recipe))}</code></p>`;
        const budget = DATA.report.passes.map((p) => p.details && p.details.budget).find((b) => b);
        if (budget) html += `<p>Budget <b>${esc(budget.budget)}</b>${budget.sensitivity ? ` (${esc(budget.sensitivity)} sensitivity)` : ""}: ` +
          `${fmtBytes(budget.bytes)} of ${fmtBytes(budget.limit_bytes)} allowed, ${fmtNum(budget.bits_per_weight)} bits per weight; ` +
          esc(Object.entries(budget.widths).filter(([, n]) => n).map(([bits, n]) => `${n} at ${bits} bits`).join(", ")) +
          `. The width options column lists each width's error and bytes, the chosen one in brackets.</p>`;
        if (DATA.report.passes.length) html += `<table><thead><tr><th>pass</th><th>modified</th><th>seconds</th><th>peak RSS MB</th><th>details</th></tr></thead><tbody>` +
          DATA.report.passes.map((p) => `<tr><td>${esc(p.name)}</td><td>${p.modified}</td><td class="num">${fmtNum(p.seconds)}</td><td class="num">${Math.round(p.peak_rss_mb)}</td><td>${esc(JSON.stringify(p.details))}</td></tr>`).join("") + "</tbody></table><br>";
      }
      for (const w of DATA.warnings) html += `<p class="warn">${esc(w)}</p>`;
      const columns = [["#", (r, i) => i + 1, 1], ["layer", (r) => r.layer], ["kind", (r) => r.kind], ["weight", (r) => r.weight], ["shape", (r) => JSON.stringify(r.shape)],
        ["status", (r) => r.status], ["bits", (r) => r.bits, 1], ["group", (r) => r.group_size, 1], ["axis", (r) => r.axis],
        ["AdaDim", (r) => r.adadim_choice && adadimText(r)], ["width options", (r) => r.width_options && widthText(r)], ["bytes before", (r) => r.bytes_before, 1], ["bytes after", (r) => r.bytes_after, 1],
        ["ratio", (r) => r.bytes_before ? r.bytes_after / r.bytes_before : null, 1], ["rel. error", (r) => r.relative_error, 1], ["output error", (r) => r.output_error, 1], ["note", (r) => r.reason]];
      const order = rows.map((r, i) => i);
      let sortColumn = 0, ascending = true;
      const draw = () => {
        const body = order.map((i) => `<tr data-row="${i}">` + columns.map(([name, get, numeric]) => {
          const v = get(rows[i], i);
          const text = v == null ? "" : name.startsWith("bytes") ? fmtBytes(v) : numeric && typeof v === "number" && !Number.isInteger(v) ? fmtNum(v) : v;
          const style = name === "rel. error" && v != null && errorRange ? ` style="background:${errorColor(v)}"` : "";
          return `<td class="${numeric ? "num" : name === "note" ? "wrap" : ""}"${style}>${esc(text)}</td>`;
        }).join("") + "</tr>").join("");
        el.querySelector("table.layers").innerHTML = `<thead><tr>${columns.map(([name], c) => `<th data-col="${c}" class="${c === sortColumn ? (ascending ? "sorted-asc" : "sorted-desc") : ""}">${name}</th>`).join("")}</tr></thead><tbody>${body}</tbody>`;
      };
      el.innerHTML = html + `<p class="hint">Click a header to sort, a row to show the layer in the graph.</p><table class="layers"></table>`;
      el.querySelector("table.layers").addEventListener("click", (e) => {
        const th = e.target.closest("th"), tr = e.target.closest("tr[data-row]");
        if (th) {
          const c = +th.dataset.col, get = columns[c][1];
          ascending = c === sortColumn ? !ascending : true;
          sortColumn = c;
          const key = (i) => get(rows[i], i);
          order.sort((a, b) => { const x = key(a), y = key(b); if (x == null) return 1; if (y == null) return -1; return (x < y ? -1 : x > y ? 1 : a - b) * (ascending ? 1 : -1); });
          draw();
        } else if (tr) this.jump(pane, rows[+tr.dataset.row].node);
      });
      draw();
    }

    // ---- plots tab: error and bytes per layer (SVG bar charts) ----
    plotsTab() {
      const el = $("tab-plots"), pane = this.panes[DATA.layers.pane];
      const rows = DATA.layers.rows.filter((r) => r.status === "quantized"), floats = DATA.layers.rows.length - rows.length;
      const chart = (title, series, colors, format) => {
        const top = Math.max(...series.flat().filter((v) => v != null), 1e-12);
        const H = 220, left = 70, bw = Math.max(3, Math.min(18, 1100 / rows.length)), W = left + rows.length * bw + 20, groupW = bw / series.length;
        let bars = "";
        rows.forEach((r, i) => series.forEach((s, k) => {
          const v = s[i];
          if (v == null) return;
          const bh = (H * v) / top, fill = typeof colors[k] === "function" ? colors[k](v) : colors[k];
          bars += `<rect class="bar" data-row="${i}" x="${(left + i * bw + k * groupW).toFixed(1)}" y="${(20 + H - bh).toFixed(1)}" width="${Math.max(1, groupW - 0.5).toFixed(1)}" height="${bh.toFixed(1)}" fill="${fill}"><title>${esc(r.layer)}: ${esc(format(v))}</title></rect>`;
        }));
        const ticks = [0, 0.5, 1].map((t) => `<text x="${left - 6}" y="${(24 + H - H * t).toFixed(1)}" text-anchor="end">${esc(format(top * t))}</text><line x1="${left}" x2="${W - 10}" y1="${20 + H - H * t}" y2="${20 + H - H * t}" stroke="#e3e6ea"/>`).join("");
        return `<h3>${title}</h3><svg class="plot" width="${W}" height="${H + 50}">${ticks}${bars}<text x="${left}" y="${H + 40}">quantized layers in graph order (${rows.length}; ${floats} left in float not shown); hover a bar for its name, click to show it</text></svg>`;
      };
      let html = "";
      const errs = rows.map((r) => r.relative_error ?? null);
      html += errs.some((e) => e != null) ? chart("Relative weight error per layer", [errs], [(v) => errorColor(v)], fmtNum) :
        "<h3>Relative weight error per layer</h3><p class=\"hint\">No errors to show: pass the optimizer's report with --report.</p>";
      if (rows.some((r) => r.output_error != null)) html += chart("Output error per layer", [rows.map((r) => r.output_error ?? null)], ["#8e6bbf"], fmtNum);
      html += chart("Bytes per layer: before (grey) and after (blue)", [rows.map((r) => r.bytes_before ?? null), rows.map((r) => r.bytes_after ?? null)], ["#b9c0c8", "#3f7fc1"], fmtBytes);
      el.innerHTML = rows.length ? html : "<p>No quantized weights in this model.</p>";
      el.addEventListener("click", (e) => { const bar = e.target.closest("[data-row]"); if (bar) this.jump(pane, rows[+bar.dataset.row].node); });
    }

    // ---- changes tab: what differs between the two models ----
    changesTab() {
      const el = $("tab-changes"), s = DATA.diff.summary, LIMIT = 2000;
      const counts = (status) => Object.entries(s.nodes[status]).map(([op, c]) => `${c} ${esc(op)}`).join(", ") || "none";
      let html = `<p><b>${esc(DATA.diff.before)}</b> → <b>${esc(DATA.diff.after)}</b></p><table><tbody>` +
        `<tr><td>added nodes (only in ${esc(DATA.diff.after)})</td><td>${counts("added")}</td></tr>` +
        `<tr><td>removed nodes (only in ${esc(DATA.diff.before)})</td><td>${counts("removed")}</td></tr>` +
        `<tr><td>rewritten nodes</td><td>${counts("rewritten")}</td></tr>` +
        `<tr><td>initializers</td><td>+${s.initializers.added} (${fmtBytes(s.initializers.addedBytes)}), −${s.initializers.removed} (${fmtBytes(s.initializers.removedBytes)})</td></tr>` +
        `<tr><td>all tensor bytes</td><td>${fmtBytes(s.bytes.before)} → ${fmtBytes(s.bytes.after)}</td></tr></tbody></table>`;
      const items = [];
      this.panes.forEach((p) => p.model.nodes.forEach((n, i) => { if (n.diff && (n.diff !== "rewritten" || p === this.main)) items.push([p, i]); }));
      html += `<h3>Changed nodes${items.length > LIMIT ? ` (first ${LIMIT} of ${items.length})` : ""}</h3><table class="changes"><thead><tr><th>change</th><th>op</th><th>name</th><th>module</th><th>note</th></tr></thead><tbody>` +
        items.slice(0, LIMIT).map(([p, i]) => { const n = p.model.nodes[i]; return `<tr data-pane="${p.number}" data-node="${i}"><td>${n.diff}</td><td>${esc(n.op)}</td><td>${esc(n.name)}</td><td>${esc(n.path)}</td><td class="wrap">${esc(n.diffNote || "")}</td></tr>`; }).join("") + "</tbody></table>";
      el.innerHTML = html;
      el.addEventListener("click", (e) => { const tr = e.target.closest("tr[data-node]"); if (tr) this.jump(this.panes[+tr.dataset.pane], +tr.dataset.node); });
    }
  }

  const app = new App();
  const drawn = performance.now();
  window.lowbitViewer = app; // for tests and the benchmark
  // First render: the first view is drawn and the browser has run the frame after it.
  requestAnimationFrame(() => setTimeout(() => {
    window.__firstRenderMs = performance.now();
    window.__timings = { scriptStart: started, dataParsed: parsed, firstViewDrawn: drawn, firstRender: window.__firstRenderMs };
    document.body.dataset.ready = "1";
  }, 0));
})();
