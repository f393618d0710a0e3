// The MicroBERT page: fill [MASK] through POST /fill-mask, describe the model from /info, and draw
// the run's training curves from /history. Plain DOM and SVG; every model string goes in as text.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

async function describeModel() {
  try {
    const response = await fetch("info");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    $("model").textContent =
      `step ${info.step ?? "?"} · ${info.num_hidden_layers} layers, hidden ${info.hidden_size}, ` +
      `vocabulary ${info.vocab_size}, ${info.max_position_embeddings} positions · ${info.device} ${info.dtype}` +
      ` · ${info.model}`;
    $("model").dataset.step = info.step;
  } catch (error) {
    $("model").textContent = `no model description yet (${error.message})`;
  }
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function fill(event) {
  if (event) event.preventDefault();
  const text = $("text").value;
  const topK = Number($("top-k").value) || 5;
  const out = $("results");
  out.replaceChildren(el("p", { class: "hint" }, "predicting…"));
  $("go").disabled = true;
  try {
    const response = await fetch("fill-mask", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ inputs: text, parameters: { top_k: topK } }),
    });
    const body = await response.json();
    if (!response.ok) {
      if (response.status === 401) $("key-label").hidden = false;
      out.replaceChildren(el("p", { class: "error", id: "error" }, `${response.status} ${body.error_type}: ${body.error}`));
      return;
    }
    // one mask: a list of candidates; several masks: one list per mask
    const perMask = Array.isArray(body[0]) ? body : [body];
    out.replaceChildren(...perMask.map((candidates, i) => renderMask(candidates, i, perMask.length)));
  } catch (error) {
    out.replaceChildren(el("p", { class: "error", id: "error" }, `request failed: ${error.message}`));
  } finally {
    $("go").disabled = false;
  }
}

function renderMask(candidates, index, count) {
  const box = el("div", { class: "mask" });
  box.append(el("h3", {}, count > 1 ? `[MASK] ${index + 1} of ${count}` : "[MASK]"));
  const top = Math.max(...candidates.map((c) => c.score), 1e-12);
  const list = el("ol", { class: "candidates" });
  for (const c of candidates) {
    const row = el("li", { class: "candidate" });
    row.append(el("span", { class: "token", title: c.sequence }, c.token_str));
    const bar = el("span", { class: "bar" });
    bar.append(el("span", { style: `width: ${((100 * c.score) / top).toFixed(1)}%` }));
    row.append(bar, el("span", { class: "score" }, c.score.toFixed(4)));
    list.append(row);
  }
  box.append(list);
  if (candidates.length) box.append(el("div", { class: "sequence" }, candidates[0].sequence));
  return box;
}

// --- training curves -------------------------------------------------------------------------------
function lineChart(container, { title, series, percent = false }) {
  const W = 420, H = 250, L = 48, R = 10, T = 36, B = 30;
  const points = series.flatMap((s) => s.points).filter(([, y]) => y !== null && Number.isFinite(y));
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": title });
  svg.append(el("svg:text", { x: L, y: 14, "font-weight": "600" }, title));
  container.replaceChildren(svg);
  if (!points.length) return;
  const xs = points.map(([x]) => x), ys = points.map(([, y]) => y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (percent) y0 = Math.min(0, y0);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const fmt = (y) => (percent ? `${(100 * y).toFixed(y1 - y0 < 0.05 ? 1 : 0)}%` : y.toFixed(2));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: py(y), y2: py(y), stroke: "#e5e7eb" }));
    svg.append(el("svg:text", { x: L - 4, y: py(y) + 4, "text-anchor": "end" }, fmt(y)));
  }
  svg.append(el("svg:text", { x: L, y: H - 8 }, `step ${x0}`));
  svg.append(el("svg:text", { x: W - R, y: H - 8, "text-anchor": "end" }, `step ${x1}`));
  let legendX = L;
  for (const s of series) {
    const valid = s.points.filter(([, y]) => y !== null && Number.isFinite(y));
    if (!valid.length) continue;
    const line = el("svg:polyline", {
      class: `series ${s.name}`,
      "data-points": String(valid.length),
      points: valid.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" "),
      fill: "none", stroke: s.color, "stroke-width": s.width || 1.5,
    });
    if (s.dashed) line.setAttribute("stroke-dasharray", "5 4");
    svg.append(line);
    if (s.dots) for (const [x, y] of valid) svg.append(el("svg:circle", { cx: px(x), cy: py(y), r: 2.5, fill: s.color }));
    svg.append(el("svg:rect", { x: legendX, y: 22, width: 10, height: 3, fill: s.color }));
    svg.append(el("svg:text", { x: legendX + 14, y: 27 }, s.label));
    legendX += 26 + 6.5 * s.label.length;
  }
}

async function drawHistory() {
  const response = await fetch("history");
  if (!response.ok) return; // an artifact folder, not a run folder: no curves to show
  const h = await response.json();
  const train = h.train || [], evals = h.eval || [];
  $("history").hidden = false;
  const last = evals[evals.length - 1];
  $("history-note").textContent = last
    ? `held-out masked-token accuracy at step ${last.step}: ${(100 * last.accuracy).toFixed(2)}% ` +
      `vs ${(100 * last.baseline_accuracy).toFixed(2)}% for the most frequent token`
    : `${train.length} logged steps, no evaluation yet`;
  lineChart($("loss-chart"), {
    title: "MLM loss",
    series: [
      { name: "train-loss", label: "train", color: "#2563eb", width: 1, points: train.map((r) => [r.step, r.loss]) },
      { name: "eval-loss", label: "held-out", color: "#dc2626", dots: true, points: evals.map((r) => [r.step, r.loss]) },
    ],
  });
  lineChart($("accuracy-chart"), {
    title: "held-out masked-token accuracy",
    percent: true,
    series: [
      { name: "accuracy", label: "model", color: "#16a34a", dots: true, points: evals.map((r) => [r.step, r.accuracy]) },
      { name: "baseline", label: "most frequent token", color: "#6b7280", dashed: true, points: evals.map((r) => [r.step, r.baseline_accuracy]) },
    ],
  });
}

$("form").addEventListener("submit", fill);
$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) fill(event);
});
describeModel();
drawHistory().catch(() => {});
