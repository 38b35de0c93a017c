// AdaLLaVA playground: a client of this server's OpenAI-compatible API, nothing more (no framework, no network
// beyond this origin). GET /v1/adallava/info once, then POST /v1/chat/completions (SSE for "Ask", JSON with
// adallava.attention for "Compare budgets"). body[data-state] (loading | idle | running | done | error) and
// body[data-runs] say where the page is, for people and for the browser test.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, imageName: "", runs: 0 };
const KEY_STORE = "adallava-api-key";

function setState(s) {
  document.body.dataset.state = s;
}

function finishRun(ok) {
  state.runs += 1;
  document.body.dataset.runs = String(state.runs);
  setState(ok ? "done" : "error");
}

// ------------------------------------------------------------------------------------------------ errors

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const STATUS_WORDS = { 400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
  408: "Request timeout", 413: "Too large", 422: "Unprocessable", 429: "Too many requests" };

// A 4xx/5xx response -> one readable sentence: the API's own message (OpenAI-style body), the field it names, and
// what to do for 401 (the key) and 429 (Retry-After).
async function readError(resp) {
  let text = "";
  let err = null;
  try {
    text = await resp.text();
    const body = JSON.parse(text);
    err = body && body.error ? body.error : null;
    if (err === null && body && body.detail) err = { message: JSON.stringify(body.detail) };
  } catch (_) { /* not JSON: show the text as is */ }
  const message = (err && err.message) || text || resp.statusText || "no details";
  const label = STATUS_WORDS[resp.status] || (resp.status >= 500 ? "Server error" : "Error");
  let out = `${resp.status} ${label}: ${message}`;
  if (err && err.param && !message.includes(err.param)) out += ` (field: ${err.param})`;
  if (resp.status === 401 || resp.status === 403) {
    out += " — this server needs an API key: enter it in the API key field at the top right.";
  }
  if (resp.status === 429) {
    const retry = resp.headers.get("Retry-After");
    // the server's message may already say when; the header is the authority
    if (!retry) out += " — the server is overloaded; retry later.";
    else if (!message.toLowerCase().includes(`retry after ${retry} s`)) out += ` — retry after ${retry} s.`;
  }
  return new ApiError(resp.status, out);
}

function showError(e) {
  const box = $("error");
  box.textContent = e instanceof ApiError ? e.message : `Could not reach the server: ${e.message || e}`;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ------------------------------------------------------------------------------------------------ API

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadInfo() {
  setState("loading");
  try {
    const resp = await fetch("/v1/adallava/info", { headers: headers() });
    if (!resp.ok) throw await readError(resp);
    const info = await resp.json();
    state.info = info;
    const slider = $("budget");
    slider.min = String(info.budget_range[0]);
    slider.max = String(info.budget_range[1]);
    // one slider step = one plan step (1/L for layers, 1/(units*L) for heads) when that is not too fine
    const step = info.grid.length > 1 && info.grid.length <= 65 ? info.grid[1] - info.grid[0] : 0.01;
    slider.step = String(step);
    slider.value = String(info.budget_range[1]);
    showBudget();
    const head = info.granularity === "head";
    $("unit-word").textContent = head ? "attention heads and MLP neuron groups" : "layers";
    $("model-facts").innerHTML = "";
    const facts = [["model", info.model_name], ["layers", `${info.num_layers} (${info.num_prefix_layers} prefix)`],
      ["granularity", info.granularity], ["budgets", `${fmt(info.budget_range[0], 3)} – 1`]];
    if (info.token_selection !== "none") facts.push(["token selection", info.token_selection]);
    for (const [k, v] of facts) {
      const span = document.createElement("span");
      span.innerHTML = `<b></b> `;
      span.firstChild.textContent = k;
      span.appendChild(document.createTextNode(v));
      $("model-facts").appendChild(span);
    }
    clearError();
    setState("idle");
  } catch (e) {
    $("model-facts").textContent = "not connected";
    showError(e);
    setState("error");
  }
}

function messages() {
  const content = [];
  if (state.image) content.push({ type: "image_url", image_url: { url: state.image } });
  content.push({ type: "text", text: $("question").value });
  return [{ role: "user", content }];
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function requestBody(extra) {
  const body = { model: state.info ? state.info.model_name : undefined, messages: messages(),
    max_tokens: parseInt($("max-tokens").value, 10) || 24, ...extra };
  return body;
}

// Server-sent events from a fetch body: "data: {...}\n\n" ... "data: [DONE]\n\n".
async function* sse(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ Ask

async function ask() {
  if (document.body.dataset.state === "running") return;
  clearError();
  setState("running");
  const extra = { stream: true };
  const m = mode();
  if (m === "budget") extra.budget = parseFloat($("budget").value);
  if (m === "latency") extra.latency_ms = parseFloat($("latency").value);
  resetResult(); // a failed request must not leave the previous request's plan and figures on show
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.chunks = "0";
  answer.classList.add("streaming");
  $("status").textContent = m === "auto" ? "asking (the server picks the budget)…" : "asking…";
  let final = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(requestBody(extra)) });
    if (!resp.ok) throw await readError(resp);
    for await (const chunk of sse(resp)) {
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        answer.textContent += delta.content;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
      }
      if (chunk.adallava) final = { ada: chunk.adallava, finish: chunk.choices[0].finish_reason };
    }
    if (final === null) throw new ApiError(0, "The stream ended without its final event (no adallava object).");
    if (!answer.textContent) answer.innerHTML = '<span class="muted">(empty answer)</span>';
    $("status").textContent = `finished: ${final.finish === "length" ? "max tokens reached" : "end of answer"}`;
    renderResult(final.ada, m);
    finishRun(true);
  } catch (e) {
    $("status").textContent = "";
    showError(e);
    finishRun(false);
  } finally {
    answer.classList.remove("streaming");
  }
}

function resetResult() {
  $("plan").innerHTML = "";
  delete $("plan").dataset.plan;
  $("flops").textContent = "–";
  $("budget-used").textContent = "";
  $("latency-bar").innerHTML = "";
  $("latency-text").textContent = "";
  $("load").textContent = "–";
  $("load").classList.remove("highlight");
}

function renderResult(ada, m) {
  renderPlan($("plan"), ada, false);
  $("flops").textContent = flopsText(ada.flops);
  let used = `budget ${fmt(ada.budget, 3)}`;
  if (m === "budget") used += ` (asked ${fmt(ada.budget_cap, 3)})`;
  if (m === "latency") used += ` (for a ${fmt(ada.latency_ms_target, 0)} ms target)`;
  if (m === "auto") used += " (chosen by the server)";
  $("budget-used").textContent = used;
  renderLatency($("latency-bar"), $("latency-text"), ada.latency_ms);
  const l = ada.load || {};
  const loadBox = $("load");
  loadBox.classList.toggle("highlight", m === "auto");
  loadBox.textContent = `server's load-aware budget ${fmt(ada.budget_server, 3)} for a ` +
    `${fmt(ada.deadline_ms, 0)} ms deadline at ` +
    `${fmt(l.requests_per_replica, 2)} requests per replica (${fmt(l.cluster_ongoing, 0)} ongoing on ` +
    `${l.replicas} replica${l.replicas === 1 ? "" : "s"}; contention ×${fmt(l.contention, 2)}; load from ${l.source}; ` +
    `batch of ${ada.batch_size})` + (m === "auto" ? "" : ". Your cap wins when it is lower.");
}

// ------------------------------------------------------------------------------------------------ pictures

function fmt(x, digits) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

function flopsText(f) {
  if (typeof f !== "number") return "–";
  if (f >= 1e12) return `${(f / 1e12).toFixed(2)} TFLOPs`;
  if (f >= 1e9) return `${(f / 1e9).toFixed(3)} GFLOPs`;
  return `${(f / 1e6).toFixed(1)} MFLOPs`;
}

const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a URL that is fetched

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function cellState(i, frac, P) {
  if (i < P) return "prefix";
  if (frac >= 0.999) return "run";
  return frac > 0 ? "part" : "skip";
}

// The execution plan as a grid: one column per decoder layer. Layer granularity: one cell per layer. Head
// granularity: one row per attention-head unit and one per MLP neuron group (adallava.execution_units).
// container[data-plan] holds the same picture as text (P prefix, # ran, + partly, . skipped).
function renderPlan(container, ada, compact) {
  const info = state.info;
  const plan = ada.execution_plan;
  const P = info ? info.num_prefix_layers : 0;
  const L = plan.length;
  const head = info && info.granularity === "head" && Array.isArray(ada.execution_units);
  const units = head ? ada.execution_units[0][0].length : 1;
  const rows = head ? 2 * units : 1;
  const cell = compact ? 14 : Math.max(12, Math.min(30, Math.floor(560 / L) - 2));
  const ch = head ? Math.max(6, Math.floor((compact ? 56 : 110) / rows)) : cell;
  const gap = 2;
  const left = head ? 44 : 0;
  const width = left + L * (cell + gap);
  const height = rows * (ch + gap) + (head ? gap * 3 : 0) + (compact ? 2 : 16);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  const text = [];
  for (let i = 0; i < L; i++) {
    const s = cellState(i, plan[i], P);
    text.push({ prefix: "P", run: "#", part: "+", skip: "." }[s]);
    for (let r = 0; r < rows; r++) {
      let cs = s;
      if (head && i >= P) {
        const kind = r < units ? 0 : 1;
        cs = ada.execution_units[i - P][kind][r % units] ? "run" : "skip";
      }
      const y = r * (ch + gap) + (head && r >= units ? gap * 3 : 0);
      const rect = svgEl("rect", { x: left + i * (cell + gap), y, width: cell, height: ch, rx: 3,
        class: `cell ${cs}`, "data-layer": i, "data-state": cs });
      const title = svgEl("title", {});
      title.textContent = `layer ${i}: ${i < P ? "prefix layer, always runs" :
        `${Math.round(plan[i] * 100)}% of its ${head ? "units" : "compute"} ran`}`;
      rect.appendChild(title);
      svg.appendChild(rect);
    }
    if (!compact) {
      const t = svgEl("text", { x: left + i * (cell + gap) + cell / 2, y: height - 3, class: "axis",
        "text-anchor": "middle" });
      t.textContent = String(i);
      svg.appendChild(t);
    }
  }
  if (head) {
    for (const [label, y] of [["heads", ch * units / 2], ["MLP", (ch + gap) * units + gap * 3 + ch * units / 2]]) {
      const t = svgEl("text", { x: 0, y: y + 4, class: "axis" });
      t.textContent = label;
      svg.appendChild(t);
    }
  }
  container.innerHTML = "";
  container.appendChild(svg);
  container.dataset.plan = text.join("");
  if (!compact) {
    const ran = plan.reduce((a, b) => a + b, 0);
    const note = document.createElement("div");
    note.className = "muted";
    note.textContent = `${fmt(ran, 2)} of ${L} layers' compute ran (layers 0–${P - 1} are the prefix: the ` +
      `scheduler reads the latency token after them and plans the rest)`;
    container.appendChild(note);
  }
}

function renderLatency(bar, textBox, lat) {
  bar.innerHTML = "";
  if (!lat) return;
  const parts = [["queue", lat.queue], ["prefill", lat.prefill], ["decode", lat.decode]];
  const total = parts.reduce((a, [, v]) => a + Math.max(v || 0, 0), 0) || 1;
  for (const [name, v] of parts) {
    const seg = document.createElement("span");
    seg.className = `seg ${name}`;
    seg.style.width = `${(100 * Math.max(v || 0, 0)) / total}%`;
    seg.title = `${name} ${fmt(v, 1)} ms`;
    bar.appendChild(seg);
  }
  textBox.innerHTML = "";
  for (const [name, v] of parts) {
    const s = document.createElement("span");
    s.className = `lat ${name}`;
    s.textContent = `${name} ${fmt(v, 0)} ms`;
    textBox.appendChild(s);
  }
  const rest = document.createElement("span");
  rest.textContent = `total ${fmt(lat.total, 0)} ms` + (lat.server !== undefined ? ` (server ${fmt(lat.server, 0)})` : "");
  textBox.appendChild(rest);
}

// "inferno"-like colour map from a few stops, v in [0, 1]
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function heat(v) {
  const x = Math.min(Math.max(v, 0), 1) * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2);
  const t = x - i;
  return STOPS[i].map((c, k) => Math.round(c + t * (STOPS[i + 1][k] - c)));
}

async function drawOverlay(canvas, dataUrl, att) {
  const img = new Image();
  img.src = dataUrl;
  await img.decode();
  const ctx = canvas.getContext("2d");
  const S = canvas.width;
  ctx.clearRect(0, 0, S, S);
  if (att.region === "center_square") { // what the vision tower sees: the central square, resized
    const s = Math.min(img.naturalWidth, img.naturalHeight);
    ctx.drawImage(img, (img.naturalWidth - s) / 2, (img.naturalHeight - s) / 2, s, s, 0, 0, S, S);
  } else {
    ctx.drawImage(img, 0, 0, S, S);
  }
  // colours span the map's own range (min -> dark, max -> bright), so a nearly flat map still shows its shape;
  // the caption gives the range in absolute terms
  const grid = att.grid;
  const n = grid.length;
  const flat = grid.flat();
  const lo = Math.min(...flat);
  const hi = Math.max(...flat);
  const c = S / n;
  for (let r = 0; r < n; r++) {
    for (let k = 0; k < grid[r].length; k++) {
      const v = hi > lo ? (grid[r][k] - lo) / (hi - lo) : 0.5;
      const [R, G, B] = heat(v);
      ctx.fillStyle = `rgba(${R},${G},${B},${0.25 + 0.5 * v})`;
      ctx.fillRect(k * c, r * c, c, c);
    }
  }
  return [lo, hi];
}

// ------------------------------------------------------------------------------------------------ Compare budgets

async function compare() {
  if (document.body.dataset.state === "running") return;
  clearError();
  if (!state.image) {
    showError(new ApiError(0, "Compare budgets needs an image: the overlay is the latency token's attention over it."));
    finishRun(false);
    return;
  }
  const budgets = $("compare-budgets").value.split(",").map((s) => s.trim()).filter((s) => s);
  const bad = budgets.filter((s) => !isFinite(Number(s)));
  if (bad.length || !budgets.length) {
    showError(new ApiError(0, `Budgets to compare must be numbers separated by commas; not a number: ${bad.join(", ")}`));
    finishRun(false);
    return;
  }
  setState("running");
  const panel = $("compare-panel");
  panel.hidden = false;
  $("compare-question").textContent = `— “${$("question").value}”`;
  const cards = $("compare-cards");
  cards.innerHTML = "";
  const image = state.image;
  // all budgets at once: the replica batches them together, each row with its own plan
  const jobs = budgets.map(async (b) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.budget = b;
    card.innerHTML = `<div class="card-title">budget ${b}</div><canvas width="320" height="320"></canvas>
      <div class="card-overlay muted"></div>
      <div class="card-plan"></div><div class="card-answer muted">running…</div><div class="card-stats muted"></div>`;
    cards.appendChild(card);
    try {
      const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
        body: JSON.stringify(requestBody({ budget: Number(b), adallava: { attention: true } })) });
      if (!resp.ok) throw await readError(resp);
      const body = await resp.json();
      const ada = body.adallava;
      card.querySelector(".card-title").textContent = `${Math.round(Number(b) * 100)}% compute budget`;
      const answer = card.querySelector(".card-answer");
      answer.classList.remove("muted");
      answer.textContent = body.choices[0].message.content || "(empty answer)";
      renderPlan(card.querySelector(".card-plan"), ada, true);
      if (ada.budget < Number(b) - 1e-9) { // a cap, not an order: the server's load-aware choice was lower
        card.querySelector(".card-title").textContent += ` → ${fmt(ada.budget, 3)} (server under load)`;
      }
      const ran = ada.execution_plan.reduce((x, y) => x + y, 0);
      card.querySelector(".card-stats").textContent = `${fmt(ran, Number.isInteger(ran) ? 0 : 2)} of ` +
        `${ada.execution_plan.length} layers ran · ${flopsText(ada.flops)} · prefill ` +
        `${fmt(ada.latency_ms.prefill, 0)} ms · decode ${fmt(ada.latency_ms.decode, 0)} ms`;
      const [lo, hi] = await drawOverlay(card.querySelector("canvas"), image, ada.attention);
      card.querySelector(".card-overlay").textContent = `attention per patch (${ada.attention.grid.length}×` +
        `${ada.attention.grid.length}, layer ${ada.attention.layer}): ${(100 * lo).toFixed(1)}% (dark) to ` +
        `${(100 * hi).toFixed(1)}% (bright)`;
      card.dataset.state = "done";
      return true;
    } catch (e) {
      card.dataset.state = "error";
      card.querySelector(".card-answer").textContent = e.message;
      showError(e);
      return false;
    }
  });
  const ok = await Promise.all(jobs);
  finishRun(ok.every((x) => x));
}

// ------------------------------------------------------------------------------------------------ inputs

function showBudget() {
  $("budget-value").textContent = Number($("budget").value).toFixed(3);
}

function pickFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    state.imageName = file.name;
    const preview = $("preview");
    preview.hidden = false;
    $("drop-hint").hidden = true;
    $("file-name").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB)`;
    preview.onerror = () => {
      preview.hidden = true;
      $("drop-hint").hidden = false;
      $("drop-hint").textContent = "This browser cannot show the file; it is sent as is and the server will say " +
        "whether it is an image it can read.";
    };
    preview.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadInfo();
  });
  $("budget").addEventListener("input", () => {
    showBudget();
    document.querySelector('input[name="mode"][value="budget"]').checked = true;
  });
  $("latency").addEventListener("focus", () => {
    document.querySelector('input[name="mode"][value="latency"]').checked = true;
  });
  $("ask").addEventListener("click", ask);
  $("compare").addEventListener("click", compare);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask();
  });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("file").click();
  });
  $("file").addEventListener("change", () => pickFile($("file").files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  loadInfo();
}

init();
