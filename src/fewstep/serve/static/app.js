// fewstep serve: every change of a control sends one request over the WebSocket; the server keeps only the
// newest per client (latest wins), so the page never waits for stale images. A request the server was too busy
// to take is sent again after a short back-off; while the newest request is pending the page says so. No build
// step, no CDN, no inline script (the server's Content-Security-Policy allows only this file).
"use strict";

const $ = (id) => document.getElementById(id);
const page = { info: null, ws: null, nextId: 1, lastSent: 0, lastShown: 0, lastFailed: 0, lastMessage: "",
               sentAt: {}, results: 0, errors: 0, retry: 500, busyDelay: 250, busyTimer: 0, busyRetries: 0 };
window.fewstepPage = page;                     // read by the browser test
const token = new URLSearchParams(location.search).get("token");   // --token: also kept as a cookie by the server

function connect() {
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${query}`);
  page.ws = ws;
  ws.onopen = () => { $("conn").textContent = "live"; $("conn").classList.add("live"); page.retry = 500; };
  ws.onclose = (event) => {
    $("conn").textContent = event.code === 1008 ? `refused: ${event.reason}` : "reconnecting…";
    $("conn").classList.remove("live");
    page.lastMessage = "";
    clearTimeout(page.busyTimer);
    setTimeout(connect, page.retry); page.retry = Math.min(page.retry * 2, 8000);
  };
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "hello") setup(msg.info);
    else if (msg.type === "result") show(msg);
    else if (msg.type === "error") fail(msg);
  };
}

function setRange(input, lo, hi, value, step) {
  input.min = lo; input.max = hi; if (step) input.step = step; input.value = value;
}

function setup(info) {
  const first = page.info === null;
  page.info = info;
  $("model").textContent = `${info.model} · ${info.text ? "text-to-image" : "class-conditional"} · ` +
    `${info.image_size}×${info.image_size} · ${info.sampler}`;
  $("prompt-row").hidden = !info.text;
  $("label-row").hidden = info.text || !info.conditional;
  if (first) {
    const label = $("label");
    label.innerHTML = "";
    if (!info.text && info.conditional) {
      label.add(new Option("none (unconditional)", ""));
      info.classes.forEach((name, i) => label.add(new Option(`${i}: ${name}`, String(i))));
      label.value = "0";
    }
    const steps = info.steps;
    setRange($("steps"), steps.min, steps.max, steps.default, 1);
    const g = info.guidance;                   // 1 = no guidance: the slider never goes below it
    setRange($("guidance"), Math.max(1, g.min), Math.max(1, g.max), Math.max(1, g.default), 0.1);
    $("guidance-row").hidden = g.min === g.max;
    $("num").max = info.max_num;
    $("prompt").maxLength = info.max_prompt;
    buildLoras(info.loras, info.lora_range);
    resetCanvas();
  }
  outputs();
  schedule();
}

function buildLoras(loras, range) {
  const box = $("loras");
  box.innerHTML = "";
  $("lora-box").hidden = loras.length === 0;
  loras.forEach((lora, i) => {
    const row = document.createElement("label");
    row.className = "row";
    row.textContent = `${lora.name} (${lora.kind}) `;
    const input = document.createElement("input");
    input.type = "range"; input.className = "lora"; input.dataset.index = i;
    setRange(input, Math.max(range[0], -1), Math.min(range[1], 1.5), lora.weight, 0.05);
    const out = document.createElement("output");
    row.append(input, out);
    box.append(row);
  });
}

function outputs() {
  $("steps-out").textContent = $("steps").value;
  $("guidance-out").textContent = Number($("guidance").value).toFixed(1);
  $("num-out").textContent = $("num").value;
  $("strength-out").textContent = Number($("strength").value).toFixed(2);
  document.querySelectorAll("input.lora").forEach((el) => {
    el.nextElementSibling.textContent = Number(el.value).toFixed(2);
  });
}

// --- the sketch canvas ---------------------------------------------------------------------------------
const canvas = $("sketch");
const ctx = canvas.getContext("2d");
const small = document.createElement("canvas");
let drawing = null;

function resetCanvas() {
  const dark = page.info && page.info.channels === 1;      // digits: white ink on black
  ctx.fillStyle = dark ? "#000000" : "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (dark) $("pen-color").value = "#ffffff";
}

function point(event) {
  const r = canvas.getBoundingClientRect();
  return [(event.clientX - r.left) * canvas.width / r.width, (event.clientY - r.top) * canvas.height / r.height];
}

canvas.addEventListener("pointerdown", (event) => {
  canvas.setPointerCapture(event.pointerId);
  drawing = point(event);
  stroke(drawing);
});
canvas.addEventListener("pointermove", (event) => { if (drawing) stroke(point(event)); });
canvas.addEventListener("pointerup", () => { drawing = null; sketchChanged(); });

function stroke(to) {
  ctx.strokeStyle = $("pen-color").value;
  ctx.lineWidth = Number($("pen-size").value);
  ctx.lineCap = "round";
  ctx.beginPath(); ctx.moveTo(...drawing); ctx.lineTo(...to); ctx.stroke();
  drawing = to;
  sketchChanged();
}

let sketchFrame = 0;
function sketchChanged() {               // at most one request per animation frame while drawing
  $("use-sketch").checked = true;
  if (!sketchFrame) sketchFrame = requestAnimationFrame(() => { sketchFrame = 0; schedule(); });
}

function sketchData() {
  const size = page.info.image_size;
  small.width = small.height = size;
  const s = small.getContext("2d");
  s.imageSmoothingQuality = "high";
  s.drawImage(canvas, 0, 0, size, size);
  return small.toDataURL("image/png");
}

$("clear").addEventListener("click", () => { resetCanvas(); $("use-sketch").checked = false; schedule(); });
$("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const img = new Image();
  img.onload = () => {
    const side = Math.min(img.width, img.height);
    ctx.drawImage(img, (img.width - side) / 2, (img.height - side) / 2, side, side, 0, 0, canvas.width, canvas.height);
    URL.revokeObjectURL(img.src);
    sketchChanged();
  };
  img.onerror = () => fail({ error: `${file.name} is not an image this browser can read` });
  img.src = URL.createObjectURL(file);
});

// --- requests and results ------------------------------------------------------------------------------
function seed() {                         // the seed box's value, or null (and the reason shown) when it is not one
  const input = $("seed"), text = input.value.trim(), max = page.info.seed_max;
  let error = "";
  if (input.validity.badInput || !/^[0-9]+$/.test(text)) error = `seed must be a whole number from 0 to ${max}`;
  else if (Number(text) > max) error = `seed must be at most ${max}`;
  $("seed-error").textContent = error;
  $("seed-error").hidden = !error;
  input.setAttribute("aria-invalid", String(Boolean(error)));
  return error ? null : Number(text);
}

function request() {
  const info = page.info;
  const s = seed();
  if (s === null) return null;
  const msg = { type: "generate", steps: Number($("steps").value), num: Number($("num").value), seed: s };
  if (info.guidance.min !== info.guidance.max) msg.guidance_scale = Number($("guidance").value);
  if (info.text) msg.prompt = $("prompt").value;
  else if (info.conditional && $("label").value !== "") msg.label = Number($("label").value);
  if (info.loras.length) msg.loras = [...document.querySelectorAll("input.lora")].map((el) => Number(el.value));
  if ($("use-sketch").checked) { msg.image = sketchData(); msg.strength = Number($("strength").value); }
  return msg;
}

function schedule() {
  if (!page.info || !page.ws || page.ws.readyState !== WebSocket.OPEN) return;
  outputs();
  const msg = request();
  if (msg === null) return;               // a control holds a bad value: its message is shown, nothing sent
  const key = JSON.stringify(msg);
  if (key === page.lastMessage) return;   // nothing changed: nothing to ask for
  clearTimeout(page.busyTimer);
  page.lastMessage = key;
  msg.id = page.nextId++;
  page.sentAt[msg.id] = performance.now();
  page.lastSent = msg.id;
  page.ws.send(JSON.stringify(msg));
  pending();
}

function pending(note) {                  // the newest request is neither shown nor refused (or waits to be
  const waiting = Boolean(note) || (page.lastSent > page.lastShown && page.lastSent !== page.lastFailed);
  $("pending").hidden = !waiting;         // sent again, with ``note`` saying why): say so
  $("pending").textContent = note || "generating…";
  $("results").classList.toggle("stale", waiting || page.lastSent !== page.lastShown);
}

function retryBusy() {                    // the server was busy: ask again for the newest request, backing off
  clearTimeout(page.busyTimer);
  const delay = page.busyDelay;
  page.busyTimer = setTimeout(() => { page.busyRetries += 1; page.lastMessage = ""; schedule(); }, delay);
  page.busyDelay = Math.min(delay * 2, 4000);
  pending(`server busy: trying again in ${(delay / 1000).toFixed(1)} s…`);
}

function show(msg) {
  if (msg.id < page.lastShown) return;     // an older request finished after a newer one was shown
  page.lastShown = msg.id;
  page.results += 1;
  page.busyDelay = 250;
  const box = $("results");
  while (box.children.length > msg.images.length) box.lastChild.remove();
  msg.images.forEach((src, i) => {
    let img = box.children[i];
    if (!img) { img = document.createElement("img"); img.alt = `sample ${i + 1}`; box.append(img); }
    img.src = src;
  });
  box.dataset.id = msg.id;
  const roundTrip = performance.now() - (page.sentAt[msg.id] || performance.now());
  for (const id of Object.keys(page.sentAt)) if (Number(id) <= msg.id) delete page.sentAt[id];
  $("latency").textContent = `latency ${roundTrip.toFixed(0)} ms (server ${msg.latency_ms.toFixed(0)} ms` +
    `${msg.cached ? ", cached" : ""})`;
  const s = msg.stats;
  $("throughput").textContent = `${s.images_per_second.toFixed(1)} images/s over 5 s · mean batch ` +
    `${s.mean_batch.toFixed(1)} · p95 ${s.p95_ms === null ? "–" : s.p95_ms.toFixed(0)} ms`;
  $("error").textContent = "";
  pending();
}

function fail(msg) {
  delete page.sentAt[msg.id];
  if (msg.busy) {                          // not an error of the request: it is sent again when it is the newest
    if (msg.id === page.lastSent) retryBusy();
    return;
  }
  page.errors += 1;
  if (msg.id !== null && msg.id !== undefined) page.lastFailed = Math.max(page.lastFailed, msg.id);
  $("error").textContent = msg.error;
  pending();
}

for (const id of ["prompt", "label", "steps", "guidance", "num", "seed", "strength", "use-sketch"]) {
  $(id).addEventListener("input", schedule);
  $(id).addEventListener("change", schedule);       // a select or checkbox set without an input event
}
$("loras").addEventListener("input", schedule);
$("reseed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e9); schedule(); });
connect();
