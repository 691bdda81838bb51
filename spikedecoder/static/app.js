// SpikeDecoder live: reads /api/generate's event stream and draws each token's energy and spikes.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = { snn: "#ffb347", ann: "#6fa8ff", grid: "#28324a", muted: "#8c98b3", text: "#e4e9f2" };
let info = null;
let controller = null;
let history = []; // {pj, ann_pj} per token
let latest = null; // the newest event, drawn at the next animation frame
let frame = 0; // the pending animation frame, 0 if none

function energy(pj) {
  if (pj === undefined || pj === null) return "\u2013";
  const units = [["pJ", 1], ["nJ", 1e3], ["\u00b5J", 1e6], ["mJ", 1e9]];
  let [unit, scale] = units[0];
  for (const [u, s] of units) if (pj >= s) [unit, scale] = [u, s];
  return `${(pj / scale).toPrecision(4)} ${unit}`;
}

async function loadInfo() {
  const res = await fetch("/api/info");
  info = await res.json();
  const base = info.baseline ? `, baseline ${info.baseline}` : ", no baseline (start with --baseline ANN_RUN)";
  $("info").textContent = `model ${info.model}, T = ${info.timesteps}, context ${info.max_len}${base}`;
  $("preset").textContent = `(${info.energy_preset} operation energies, 45 nm; each token = the cached step run, ${info.energy})`;
  $("tokens").max = info.max_tokens;
}

function params() {
  const p = new URLSearchParams({ prompt: $("prompt").value });
  for (const key of ["tokens", "temperature", "top_k", "top_p", "seed"]) {
    const value = $(key).value.trim();
    if (value !== "") p.set(key, value);
  }
  return p;
}

function reset() {
  history = [];
  latest = null;
  $("error").textContent = "";
  $("text").innerHTML = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  $("text").appendChild(prompt);
  for (const id of ["pj", "ann_pj", "saving"]) $(id).textContent = "\u2013";
  for (const id of ["fed", "ann_fed", "totals", "speed"]) $(id).textContent = "";
  $("count").textContent = "0";
  drawHistory();
  clearRaster();
}

async function generate() {
  reset();
  controller = new AbortController();
  $("go").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating...";
  const started = performance.now();
  try {
    const res = await fetch(`/api/generate?${params()}`, { signal: controller.signal });
    if (!res.ok) {
      const body = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
      $("error").textContent = body.error;
      $("status").textContent = "";
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ")) onToken(JSON.parse(line.slice(6)), started);
        }
      }
    }
    if (frame) cancelAnimationFrame(frame);
    draw();
    $("status").textContent = `done: ${history.length} tokens`;
  } catch (err) {
    $("status").textContent = err.name === "AbortError" ? `stopped after ${history.length} tokens` : "";
    if (err.name !== "AbortError") $("error").textContent = `connection lost: ${err.message}`;
  } finally {
    $("go").disabled = false;
    $("stop").disabled = true;
  }
}

// Tokens can arrive faster than the screen refreshes: each one is added to the text and the history at once, and the
// meters, charts and raster are drawn once per animation frame, for the newest token.
function onToken(ev, started) {
  history.push({ pj: ev.pj, ann_pj: ev.ann_pj, refill: ev.fed > 1 || ev.ann_fed > 1 });
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = ev.text;
  span.title = `token ${ev.index + 1}: ${energy(ev.pj)} spiking` + (ev.ann_pj ? `, ${energy(ev.ann_pj)} ANN` : "");
  $("text").appendChild(span);
  latest = { ev, span, seconds: (performance.now() - started) / 1000 };
  if (!frame) frame = requestAnimationFrame(draw);
}

function draw() {
  frame = 0;
  if (!latest) return;
  const { ev, span, seconds } = latest;
  const previous = $("text").querySelector(".current");
  if (previous) previous.classList.remove("current");
  span.classList.add("current");
  $("text").scrollTop = $("text").scrollHeight;
  $("pj").textContent = energy(ev.pj);
  $("fed").textContent = ev.fed > 1 ? `prefill of ${ev.fed} tokens` : "one cached step";
  if (ev.ann_pj !== undefined) {
    $("ann_pj").textContent = energy(ev.ann_pj);
    $("ann_fed").textContent = ev.ann_fed > 1 ? `prefill of ${ev.ann_fed} tokens` : "one cached step";
    $("saving").textContent = `${ev.saving_percent.toFixed(1)} %`;
    $("totals").textContent = `${energy(ev.total_pj)} vs ${energy(ev.total_ann_pj)}`;
  } else {
    $("totals").textContent = `${energy(ev.total_pj)} in all`;
  }
  $("count").textContent = String(history.length);
  $("speed").textContent = `${(history.length / seconds).toFixed(1)} tokens/s`;
  drawHistory();
  drawRaster(ev);
}

// ------------------------------------------------------------------------------------------- per-token energy
function drawHistory() {
  const canvas = $("history");
  const width = canvas.clientWidth || canvas.width;
  if (canvas.width !== width) canvas.width = width;
  const g = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  g.clearRect(0, 0, w, h);
  const pad = { l: 62, r: 10, t: 12, b: 20 };
  // single-token steps set the scale: a prefill or a refill after the window slides feeds many tokens at once
  const steps = history;
  const top = 1.15 * Math.max(1, ...steps.filter((s) => !s.refill).flatMap((s) => [s.pj, s.ann_pj || 0]));
  g.font = "11px system-ui";
  g.textBaseline = "alphabetic";
  g.fillStyle = COLORS.muted;
  g.strokeStyle = COLORS.grid;
  for (let i = 0; i <= 2; i++) {
    const y = pad.t + ((h - pad.t - pad.b) * i) / 2;
    g.beginPath();
    g.moveTo(pad.l, y);
    g.lineTo(w - pad.r, y);
    g.stroke();
    g.fillText(energy((top * (2 - i)) / 2), 4, y + 4);
  }
  g.fillText("energy of each token's step; | = a prefill (the prompt, or a refill when the context window slides)", pad.l, h - 5);
  const n = Math.max(steps.length, 50);
  const x = (i) => pad.l + ((w - pad.l - pad.r) * i) / (n - 1);
  const y = (v) => h - pad.b - ((h - pad.t - pad.b) * v) / top;
  for (const [key, color] of [["ann_pj", COLORS.ann], ["pj", COLORS.snn]]) {
    if (steps.length === 0 || steps[0][key] === undefined) continue;
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    let pen = false;
    steps.forEach((s, i) => {
      if (s.refill) return void (pen = false);
      pen ? g.lineTo(x(i), y(s[key])) : g.moveTo(x(i), y(s[key]));
      pen = true;
    });
    g.stroke();
  }
  g.fillStyle = COLORS.muted;
  steps.forEach((s, i) => s.refill && g.fillRect(x(i) - 1, pad.t, 2, h - pad.t - pad.b));
  const legend = [["spiking", COLORS.snn], ...(info && info.baseline ? [["ANN", COLORS.ann]] : [])];
  legend.forEach(([name, color], i) => {
    g.fillStyle = color;
    g.fillRect(w - 150 + 75 * i, pad.t + 6, 14, 3);
    g.fillText(name, w - 132 + 75 * i, pad.t + 11);
  });
  g.lineWidth = 1;
}

// ------------------------------------------------------------------------------------------- spike raster
function clearRaster() {
  const canvas = $("raster");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function heat(rate) {
  const t = Math.min(1, rate * 4);
  return `rgb(${Math.round(30 + 225 * t)}, ${Math.round(40 + 140 * t)}, ${Math.round(70 - 20 * t)})`;
}

// The event's `spikes`: base64 of every layer's (steps x neurons) spikes, one layer after the other (info.layers),
// row by row, 8 per byte, least significant bit first.
function unpack(spikes) {
  const bytes = Uint8Array.from(atob(spikes || ""), (c) => c.charCodeAt(0));
  let offset = 0;
  return info.layers.map((layer) => {
    const rows = [];
    for (let t = 0; t < layer.steps; t++) {
      const row = new Uint8Array(layer.neurons);
      for (let j = 0; j < layer.neurons; j++, offset++) row[j] = (bytes[offset >> 3] >> (offset & 7)) & 1;
      rows.push(row);
    }
    return { name: layer.name, rows };
  });
}

// One small canvas per layer, a pixel per (step, neuron): the raster is drawn as a few scaled images, not a rectangle
// per spike.
const bitmaps = new Map();
function bitmap(name, rows) {
  const w = rows[0].length, h = rows.length;
  let entry = bitmaps.get(name);
  if (!entry || entry.canvas.width !== w || entry.canvas.height !== h) {
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = [w, h];
    const image = canvas.getContext("2d").createImageData(w, h);
    entry = { canvas, image, pixels: new Uint32Array(image.data.buffer) };
    bitmaps.set(name, entry);
  }
  const on = 0xff47b3ff, off = 0xff2b1c15; // #ffb347 and #151c2b as little-endian RGBA words
  rows.forEach((row, t) => {
    for (let j = 0; j < w; j++) entry.pixels[t * w + j] = row[j] ? on : off;
  });
  entry.canvas.getContext("2d").putImageData(entry.image, 0, 0);
  return entry.canvas;
}

function drawRaster(ev) {
  const canvas = $("raster");
  const g = canvas.getContext("2d");
  const layers = info && info.layers.length ? unpack(ev.spikes) : [];
  const label = 150, heatW = 22, barW = 80, gap = 3;
  const rows = layers.reduce((n, layer) => n + layer.rows.length, 0);
  const rowH = Math.min(5, Math.max(2, Math.floor(420 / Math.max(rows, 1))));
  const width = canvas.clientWidth || canvas.width;
  const height = Math.max(120, rows * rowH + gap * layers.length + 8);
  if (canvas.width !== width || canvas.height !== height) [canvas.width, canvas.height] = [width, height];
  const rasterW = canvas.width - label - heatW - barW - 24;
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.imageSmoothingEnabled = false;
  g.font = "11px system-ui";
  let y = 4;
  g.textBaseline = "middle";
  for (const { name, rows: bits } of layers) {
    const rates = bits.map((row) => row.reduce((a, b) => a + b, 0) / Math.max(row.length, 1));
    const rate = rates.reduce((a, b) => a + b, 0) / Math.max(rates.length, 1);
    const bandH = bits.length * rowH;
    g.fillStyle = COLORS.muted;
    g.fillText(name.replace("blocks.", "block ").replace(".attn.", " attn ").replace(".mlp.", " mlp "), 4, y + bandH / 2);
    g.drawImage(bitmap(name, bits), label, y, rasterW, bandH); // a pixel per spike, scaled without smoothing
    rates.forEach((r, t) => {
      g.fillStyle = heat(r);
      g.fillRect(label + rasterW + 8, y + t * rowH, heatW - 4, rowH - (rowH > 2 ? 1 : 0));
    });
    g.fillStyle = COLORS.snn;
    g.fillRect(label + rasterW + heatW + 12, y, (barW - 44) * Math.min(1, rate * 2), bandH - 1);
    g.fillStyle = COLORS.text;
    g.fillText(rate.toFixed(2), canvas.width - 30, y + bandH / 2);
    y += bandH + gap;
  }
}

$("go").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
loadInfo().catch(() => ($("info").textContent = "could not reach the server"));
reset();
