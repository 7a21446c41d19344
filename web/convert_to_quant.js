// convert_to_quant web extension.
//  * Quality Report node: after a run, shows the summary, an SQNR bar chart (one bar per quantized layer,
//    red below the threshold) and a per-layer table sortable by any column (click a header).
//  * Load Weights node: shows the picked file's detected family, suggested preset, layer count and size,
//    read from the header by the server route GET /convert_to_quant/inspect.
//  * Save node: after a run, shows where the model (and its quality report) was saved.
//  Loaded once even when two copies of the pack are installed (the second copy's script does nothing).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "convert_to_quant.nodes";
const COLORS = { good: "#50aaff", bad: "#eb5050", axis: "#96969f", text: "#ddd", grid: "#333" };

function el(tag, style = {}, text) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(2) : v.toFixed(digits);
  return String(v);
}

// ---------------------------------------------------------------------------------------------
// SQNR bar chart
// ---------------------------------------------------------------------------------------------
export function drawSqnrChart(canvas, rows, threshold) {
  const bars = rows.filter((r) => r.quantized && typeof r.sqnr_db === "number");
  const w = canvas.width, h = canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#18181c";
  ctx.fillRect(0, 0, w, h);
  const left = 34, right = 6, top = 16, bottom = 14;
  const pw = w - left - right, ph = h - top - bottom;
  const vmax = Math.ceil(Math.max(10, threshold || 0, ...bars.map((b) => b.sqnr_db)) / 10 + 0.0001) * 10;
  ctx.font = "10px sans-serif";
  ctx.fillStyle = COLORS.axis;
  ctx.strokeStyle = COLORS.grid;
  for (let t = 0; t <= vmax; t += 10) {
    const y = top + ph - (ph * t) / vmax;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + pw, y);
    ctx.stroke();
    ctx.fillText(String(t), 4, y + 3);
  }
  const step = pw / Math.max(bars.length, 1);
  bars.forEach((b, i) => {
    const y = top + ph - (ph * Math.max(b.sqnr_db, 0)) / vmax;
    ctx.fillStyle = threshold != null && b.sqnr_db < threshold ? COLORS.bad : COLORS.good;
    ctx.fillRect(left + i * step, y, Math.max(1, step - (step > 3 ? 1 : 0)), top + ph - y);
  });
  if (threshold != null) {
    const y = top + ph - (ph * threshold) / vmax;
    ctx.strokeStyle = COLORS.bad;
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + pw, y);
    ctx.stroke();
    ctx.setLineDash([]);
  }
  ctx.fillStyle = COLORS.text;
  ctx.fillText(`weight SQNR (dB) per layer — ${bars.length} quantized`, left, 11);
  canvas.dataset.bars = String(bars.length);
}

// ---------------------------------------------------------------------------------------------
// Quality Report widget
// ---------------------------------------------------------------------------------------------
const TABLE_COLUMNS = [
  ["layer", "layer", (v) => v],
  ["format", "format", (v) => v],
  ["shape", "shape", (v) => v],
  ["sqnr_db", "SQNR dB", (v) => fmt(v, 2)],
  ["max_abs_err", "max err", (v) => fmt(v, 4)],
  ["note", "note", (v) => v],
];

function reportRows(report) {
  const cols = report.columns;
  return report.rows.map((r) => Object.fromEntries(cols.map((c, i) => [c, r[i]])));
}

function buildReportWidget(node) {
  const root = el("div", { display: "flex", flexDirection: "column", gap: "4px", fontSize: "11px",
                           color: COLORS.text, overflow: "hidden", height: "100%" });
  root.className = "ctq-report";
  const summary = el("div", { whiteSpace: "pre-wrap" }, "run the workflow to see the report");
  summary.className = "ctq-summary";
  const canvas = el("canvas", { width: "100%", height: "120px", flex: "0 0 auto" });
  canvas.className = "ctq-chart";
  canvas.width = 480;
  canvas.height = 120;
  const tableBox = el("div", { overflow: "auto", flex: "1 1 auto", minHeight: "60px" });
  const table = el("table", { borderCollapse: "collapse", width: "100%" });
  table.className = "ctq-table";
  tableBox.appendChild(table);
  root.append(summary, canvas, tableBox);
  const widget = node.addDOMWidget("quant_report", "quant_report", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 260,
  });
  widget.serialize = false;
  widget.ctq = { summary, canvas, table, sortKey: null, sortDesc: false, rows: [], threshold: null };
  return widget;
}

function renderTable(state) {
  const { table, rows, sortKey, sortDesc } = state;
  table.textContent = "";
  const head = el("tr");
  for (const [key, label] of TABLE_COLUMNS) {
    const arrow = key === sortKey ? (sortDesc ? " ▼" : " ▲") : "";
    const th = el("th", { cursor: "pointer", textAlign: "left", borderBottom: "1px solid #555",
                          padding: "1px 4px", position: "sticky", top: "0", background: "#222" }, label + arrow);
    th.dataset.key = key;
    th.addEventListener("click", () => {
      state.sortDesc = state.sortKey === key ? !state.sortDesc : false;
      state.sortKey = key;
      renderTable(state);
    });
    head.appendChild(th);
  }
  table.appendChild(head);
  let sorted = rows.slice();
  if (sortKey) {
    sorted.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return sortDesc ? -c : c;
    });
  }
  for (const r of sorted) {
    const tr = el("tr");
    tr.className = "ctq-row";
    const bad = state.threshold != null && typeof r.sqnr_db === "number" && r.sqnr_db < state.threshold;
    for (const [key, , f] of TABLE_COLUMNS) {
      const td = el("td", { padding: "1px 4px", whiteSpace: "nowrap",
                            color: bad && key === "sqnr_db" ? COLORS.bad : COLORS.text }, f(r[key]));
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
}

function showReport(node, report, text) {
  let widget = node.widgets?.find((w) => w.name === "quant_report");
  if (!widget) widget = buildReportWidget(node);
  const st = widget.ctq;
  st.rows = reportRows(report);
  st.threshold = report.threshold_db;
  st.summary.textContent = text || "";
  drawSqnrChart(st.canvas, st.rows, st.threshold);
  renderTable(st);
  node.setSize([Math.max(node.size[0], 520), Math.max(node.size[1], 380)]);
  node.setDirtyCanvas(true, true);
}

// ---------------------------------------------------------------------------------------------
// Load Weights info widget
// ---------------------------------------------------------------------------------------------
async function refreshWeightsInfo(node, box) {
  const w = node.widgets?.find((x) => x.name === "weights");
  if (!w || !w.value) {
    box.textContent = "no file";
    return;
  }
  box.textContent = "reading header…";
  try {
    const res = await api.fetchApi(`/convert_to_quant/inspect?weights=${encodeURIComponent(w.value)}`);
    const info = await res.json();
    if (!res.ok) {
      box.textContent = info.error || `error ${res.status}`;
      box.dataset.state = "error";
      return;
    }
    box.textContent = info.text;
    box.dataset.family = info.family || "";
    box.dataset.state = "ok";
  } catch (e) {
    box.textContent = `could not inspect: ${e}`;
    box.dataset.state = "error";
  }
}

function addWeightsInfo(node) {
  const box = el("div", { whiteSpace: "pre-wrap", fontSize: "11px", color: COLORS.text, padding: "2px 4px" });
  box.className = "ctq-weights-info";
  const widget = node.addDOMWidget("weights_info", "weights_info", box, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 56,
  });
  widget.serialize = false;
  const w = node.widgets.find((x) => x.name === "weights");
  if (w) {
    const cb = w.callback;
    w.callback = function () {
      const r = cb?.apply(this, arguments);
      refreshWeightsInfo(node, box);
      return r;
    };
  }
  // after the graph has set widget values (loading a workflow), read the header once
  setTimeout(() => refreshWeightsInfo(node, box), 0);
}

// ---------------------------------------------------------------------------------------------
// Save node: the "saved …" text the node returns
// ---------------------------------------------------------------------------------------------
function showSaved(node, lines) {
  let widget = node.widgets?.find((w) => w.name === "saved_info");
  if (!widget) {
    const box = el("div", { whiteSpace: "pre-wrap", fontSize: "11px", color: COLORS.text, padding: "2px 4px",
                            overflow: "hidden" });
    box.className = "ctq-save-info";
    widget = node.addDOMWidget("saved_info", "saved_info", box, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 44,
    });
    widget.serialize = false;
    widget.ctqBox = box;
  }
  widget.ctqBox.textContent = lines.join("\n");
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas(true, true);
}

const alreadyLoaded = app.extensions?.some((e) => e.name === EXTENSION);
if (alreadyLoaded) {
  console.warn(`${EXTENSION}: a second copy of the convert_to_quant pack is installed; using the first one`);
} else app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "QuantQualityReport") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const report = message?.quant_report?.[0];
        if (report) showReport(this, report, (message.text || []).join("\n"));
      };
    } else if (nodeData.name === "QuantSave") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        if (message?.text?.length) showSaved(this, message.text);
      };
    } else if (nodeData.name === "QuantLoadWeights") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        addWeightsInfo(this);
        return r;
      };
    }
  },
});
