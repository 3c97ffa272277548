/* STPM web page: plain JavaScript, no dependencies, no build step.
 *
 * Talks to the same-origin API with relative URLs (so it also works under a proxy prefix):
 *   POST score?heatmap=overlay, GET models, GET models/{n}/versions/{v}, POST .../activate,
 *   DELETE models/{n}/versions/{v}, POST train, GET train, GET train/{id}, DELETE train/{id}, GET readyz.
 * The API key (if the server has one) is sent as X-API-Key. It is kept for this tab's session only
 * (sessionStorage) unless the user ticks "Remember on this device" (localStorage).
 */
"use strict";

const KEY_STORAGE = "stpm.apiKey";
const JOB_STORAGE = "stpm.lastJob";
const SCORE_CHUNK = 8;          // images per /score request (the server's default limit is 32)
const POLL_MS = 1000;
const IMAGE_EXT = /\.(png|jpe?g|bmp|tiff?|webp|gif|pgm|ppm)$/i;

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
};

const state = {
  models: [],            // GET /models .models
  defaultModel: null,
  trainAvailable: null,  // null: unknown, false: the server has no /train
  job: null,             // the job being watched
  pollTimer: null,
  trainFiles: [],
};

/* ---------------------------------------------------------------- API ---------------------------- */

class ApiError extends Error {
  constructor(status, body, fallback) {
    const detail = body && (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    super(detail || fallback || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.error) || null;
    this.body = body || {};
  }
}

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || localStorage.getItem(KEY_STORAGE) || ""; }
function keyRemembered() { return !!localStorage.getItem(KEY_STORAGE); }
function storeKey(value, remember) {
  sessionStorage.removeItem(KEY_STORAGE);
  localStorage.removeItem(KEY_STORAGE);
  if (value) (remember ? localStorage : sessionStorage).setItem(KEY_STORAGE, value);
}
const KEY_WHERE = "It is sent as the X-API-Key header and kept for this browser tab's session only, " +
  "unless you tick “Remember on this device”.";

async function api(path, { method = "GET", body = null, query = null } = {}) {
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
    const s = q.toString();
    if (s) url += "?" + s;
  }
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  let res;
  try {
    res = await fetch(url, { method, body, headers });
  } catch (e) {
    throw new ApiError(0, null, "Cannot reach the server — is it running? (" + e.message + ")");
  }
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const err = new ApiError(res.status, data, text && !data ? text.slice(0, 200) : `HTTP ${res.status}`);
    if (res.status === 401) askForKey(err);
    throw err;
  }
  return data;
}

/** POST a FormData with upload progress (fetch cannot report it); same errors as api(). */
function apiUpload(path, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Accept", "application/json");
    const key = apiKey();
    if (key) xhr.setRequestHeader("X-API-Key", key);
    xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); });
    xhr.addEventListener("error", () => reject(new ApiError(0, null, "Cannot reach the server — is it running? (upload failed)")));
    xhr.addEventListener("load", () => {
      let data = null;
      try { data = xhr.responseText ? JSON.parse(xhr.responseText) : null; } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(data);
      const err = new ApiError(xhr.status, data, `HTTP ${xhr.status}`);
      if (xhr.status === 401) askForKey(err);
      reject(err);
    });
    xhr.send(body);
  });
}

/** A message an engineer can act on, for any API error. */
function explain(err, context = "") {
  if (!(err instanceof ApiError)) return String(err && err.message || err);
  switch (err.status) {
    case 0: return err.message;
    case 401: return apiKey()
      ? "The API key was refused. Enter the right key (button “API key”, top right)."
      : "This server needs an API key. Enter it with the “API key” button (top right).";
    case 409:
      if (err.code === "no_model") return "No model yet — train one first (Train tab), then score images.";
      return err.message;
    case 413: return "Too large: " + err.message;
    case 422:
      if (err.code === "invalid_image") return "Not a readable image: " + err.message;
      return (context ? context + ": " : "") + err.message;
    case 503: return "The model could not be loaded: " + err.message;
    default: return (context ? context + ": " : "") + err.message + (err.status >= 500 ? ` (HTTP ${err.status})` : "");
  }
}

/* ---------------------------------------------------------------- banner / key ------------------- */

function showBanner(msg, kind = "error") {
  const b = $("#banner");
  $("#banner-text").textContent = msg;
  b.classList.toggle("info", kind === "info");
  b.hidden = false;
}
function hideBanner() { $("#banner").hidden = true; }

let keyDialogOpenedFor401 = false;
function askForKey(err) {
  const dlg = $("#key-dialog");
  $("#key-reason").textContent = apiKey()
    ? "The server refused this key. Enter the right API key. " + KEY_WHERE
    : "This server needs an API key. " + KEY_WHERE;
  updateKeyButton(true);
  if (!dlg.open && !keyDialogOpenedFor401) {
    keyDialogOpenedFor401 = true;
    $("#key-input").value = "";
    dlg.showModal();
    $("#key-input").focus();
  }
}

function updateKeyButton(needed = false) {
  const b = $("#key-button");
  const has = !!apiKey();
  b.textContent = has ? "API key ✓" : needed ? "API key needed" : "API key";
  b.classList.toggle("danger", needed && !has);
  b.setAttribute("aria-label", has ? "API key set — change it" : "Set the API key");
}

function setupKeyDialog() {
  const dlg = $("#key-dialog");
  $("#key-button").addEventListener("click", () => {
    $("#key-reason").textContent = "If the server has an API key, enter it here. " + KEY_WHERE;
    $("#key-input").value = apiKey();
    $("#key-remember").checked = keyRemembered();
    dlg.showModal();
  });
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    storeKey($("#key-input").value.trim(), $("#key-remember").checked);
    dlg.close();
    keyDialogOpenedFor401 = false;
    updateKeyButton();
    hideBanner();
    refreshAll();
  });
  $("#key-cancel").addEventListener("click", () => dlg.close());
  $("#key-forget").addEventListener("click", () => {
    storeKey("", false);
    $("#key-input").value = "";
    dlg.close();
    keyDialogOpenedFor401 = false;
    updateKeyButton();
  });
  updateKeyButton();
}

function confirmDialog(title, text, okLabel = "Delete") {
  const dlg = $("#confirm-dialog");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-yes").textContent = okLabel;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.returnValue = "cancel";
    dlg.showModal();
    $("#confirm-no").focus();
  });
}

/* ---------------------------------------------------------------- tabs --------------------------- */

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab, focus = false) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
      $("#" + t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    history.replaceState(null, "", "#" + tab.dataset.tab);
    if (tab.dataset.tab === "models") loadModels();
    if (tab.dataset.tab === "train") loadJobs();
  };
  tabs.forEach((t, i) => {
    t.addEventListener("click", () => select(t));
    t.addEventListener("keydown", (e) => {
      const d = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (d) { e.preventDefault(); select(tabs[(i + d + tabs.length) % tabs.length], true); }
      if (e.key === "Home") { e.preventDefault(); select(tabs[0], true); }
      if (e.key === "End") { e.preventDefault(); select(tabs[tabs.length - 1], true); }
    });
  });
  const fromHash = () => {
    const t = tabs.find((x) => "#" + x.dataset.tab === location.hash);
    if (t && t.getAttribute("aria-selected") !== "true") select(t);
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();
  return select;
}
let selectTab = () => {};
const showTab = (name) => selectTab($(`[data-tab="${name}"]`));

/* ---------------------------------------------------------------- server status / models --------- */

async function refreshStatus() {
  const pill = $("#server-status");
  try {
    const res = await fetch("readyz", { headers: { Accept: "application/json" } });
    const body = await res.json().catch(() => ({}));
    if (res.ok) {
      pill.textContent = `ready · ${body.model}/${body.version}`;
      pill.className = "pill ok";
      pill.title = "Default model loaded" + (body.providers ? " on " + body.providers.join(", ") : "");
    } else {
      pill.textContent = body.error === "no_model" ? "no model yet" : "not ready";
      pill.className = "pill warn";
      pill.title = body.detail || "";
    }
  } catch {
    pill.textContent = "offline";
    pill.className = "pill bad";
  }
}

async function fetchModels() {
  const data = await api("models");
  state.models = data.models || [];
  state.defaultModel = data.default_model || null;
  fillModelSelect();
  return data;
}

function fillModelSelect(preferName = null, preferVersion = null) {
  const sel = $("#score-model");
  const prev = preferName || sel.value || "";
  sel.replaceChildren();
  if (!state.models.length) {
    sel.append(el("option", { value: "", text: "— no models yet —" }));
    sel.disabled = true;
    $("#score-model-help").textContent = "Train a model first (Train tab).";
    fillVersionSelect();
    return;
  }
  sel.disabled = false;
  $("#score-model-help").textContent = "";
  for (const m of state.models) {
    sel.append(el("option", { value: m.name, text: m.name + (m.default ? " (default)" : "") }));
  }
  const names = state.models.map((m) => m.name);
  sel.value = names.includes(prev) ? prev : (state.defaultModel && names.includes(state.defaultModel) ? state.defaultModel : names[0]);
  fillVersionSelect(preferVersion);
}

function fillVersionSelect(prefer = null) {
  const sel = $("#score-version");
  const prev = prefer || sel.value || "";
  sel.replaceChildren();
  const m = state.models.find((x) => x.name === $("#score-model").value);
  if (!m) { sel.append(el("option", { value: "", text: "—" })); sel.disabled = true; return; }
  sel.disabled = false;
  sel.append(el("option", { value: "", text: `active (${m.active_version || "none: pick a version"})` }));
  for (const v of [...m.versions].reverse()) {
    sel.append(el("option", { value: v.version, text: v.version + (v.active ? " ★" : "") }));
  }
  sel.value = [...sel.options].some((o) => o.value === prev) ? prev : "";
}

function selectedModelRef() {
  const name = $("#score-model").value;
  if (!name) return null;
  const v = $("#score-version").value;
  return v ? `${name}/${v}` : name;
}

/* ---------------------------------------------------------------- score -------------------------- */

function setupScore() {
  const dz = $("#dropzone");
  const input = $("#score-files");
  dz.addEventListener("click", () => input.click());
  dz.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  input.addEventListener("change", () => { scoreFiles([...input.files]); input.value = ""; });
  for (const ev of ["dragenter", "dragover"]) dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.add("drag"); });
  for (const ev of ["dragleave", "drop"]) dz.addEventListener(ev, () => dz.classList.remove("drag"));
  dz.addEventListener("drop", (e) => {
    e.preventDefault();
    const files = [...(e.dataTransfer?.files || [])];
    if (files.length) scoreFiles(files);
  });
  // Dropping anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("#score-model").addEventListener("change", () => fillVersionSelect());
  $("#score-clear").addEventListener("click", () => {
    for (const img of document.querySelectorAll("#results img.original")) if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    $("#results").replaceChildren();
    $("#score-summary").textContent = "";
  });
}

function newResultCard(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  card.classList.add("pending");
  $(".file", card).textContent = file.name;
  $(".file", card).title = file.name;
  const orig = $("img.original", card);
  orig.addEventListener("error", () => orig.closest("figure").remove(), { once: true });  // not an image the browser shows
  orig.src = URL.createObjectURL(file);
  orig.alt = "Uploaded image " + file.name;
  const dec = $(".decision", card);
  dec.replaceChildren(el("span", { class: "spinner", "aria-hidden": "true" }), " scoring…");
  $(".score", card).textContent = "";
  $("#results").prepend(card);
  return card;
}

function fillResultCard(card, item, meta) {
  card.classList.remove("pending", "failed");
  card.classList.toggle("anomaly", !!item.is_anomaly);
  card.dataset.score = String(item.score);
  card.dataset.decision = item.is_anomaly ? "anomaly" : "ok";
  const dec = $(".decision", card);
  dec.textContent = item.is_anomaly ? "⚠ Anomaly" : "✓ OK";
  dec.className = "decision pill " + (item.is_anomaly ? "bad" : "ok");
  const ov = $("img.overlay", card);
  if (item.overlay_png) {
    ov.src = "data:image/png;base64," + item.overlay_png;
    ov.alt = `Heatmap overlay of ${item.file}: red marks where it differs from the good images`;
  }
  const pct = Math.max(0, Math.min(1, item.score)) * 100;
  $(".scorebar-fill", card).style.width = pct.toFixed(1) + "%";
  const meter = $(".scorebar", card);
  meter.setAttribute("aria-valuenow", item.score.toFixed(3));
  meter.setAttribute("aria-label", `Score ${item.score.toFixed(3)}; threshold 0.5`);
  $(".score", card).textContent = `score ${item.score.toFixed(3)}`;
  $(".thr", card).textContent = `threshold 0.5 · raw ${fmtNum(item.raw_score)} / ${fmtNum(item.threshold)} · ${meta.model}/${meta.version}`;
  const raw = { ...item, model: meta.model, version: meta.version };
  if (raw.overlay_png) raw.overlay_png = `<${raw.overlay_png.length} base64 chars: the overlay PNG shown above>`;
  $(".raw pre", card).textContent = JSON.stringify(raw, null, 2);
}

function failResultCard(card, message, body = null) {
  card.classList.remove("pending");
  card.classList.add("failed");
  card.dataset.decision = "error";
  const dec = $(".decision", card);
  dec.textContent = "Error";
  dec.className = "decision pill bad";
  $(".ov", card)?.remove();
  const msg = $(".msg", card);
  msg.textContent = message;
  msg.hidden = false;
  $(".scorebar", card).hidden = true;
  $(".scoreline", card).hidden = true;
  if (body) $(".raw pre", card).textContent = JSON.stringify(body, null, 2);
  else $(".raw", card).hidden = true;
}

let scoring = Promise.resolve();
function scoreFiles(files) {
  if (!files.length) return;
  const model = selectedModelRef();
  const entries = files.map((f) => ({ file: f, card: newResultCard(f) }));
  // Run one selection after the other so results keep coming in order.
  scoring = scoring.then(() => scoreEntries(entries, model)).then(updateSummary);
  return scoring;
}

async function scoreEntries(entries, model) {
  hideBanner();
  for (let i = 0; i < entries.length; i += SCORE_CHUNK) {
    let chunk = entries.slice(i, i + SCORE_CHUNK);
    // A bad file fails its whole request (422 naming it): mark it, then send the rest again.
    for (let attempt = 0; chunk.length && attempt < 3; attempt++) {
      const fd = new FormData();
      for (const e of chunk) fd.append("files", e.file, e.file.name);
      try {
        const res = await api("score", { method: "POST", body: fd, query: { model, heatmap: "overlay" } });
        res.results.forEach((item, j) => fillResultCard(chunk[j].card, item, res));
        chunk = [];
      } catch (err) {
        const bad = (err instanceof ApiError && err.status === 422 && Array.isArray(err.body.files)) ? err.body.files : null;
        if (bad && bad.length) {
          const badNames = new Map(bad.map((b) => [b.file, b.reason]));
          const rest = [];
          for (const e of chunk) {
            if (badNames.has(e.file.name)) {
              const why = err.body.error === "unsupported_image_size" ? "cannot be scored by this model" : "is not a readable image";
              failResultCard(e.card, `${e.file.name} ${why}: ${badNames.get(e.file.name)}`, err.body);
            } else rest.push(e);
          }
          if (rest.length === chunk.length) { for (const e of chunk) failResultCard(e.card, explain(err), err.body); rest.length = 0; }
          chunk = rest;
          continue;
        }
        const msg = explain(err);
        for (const e of entries.slice(i)) if (e.card.classList.contains("pending")) failResultCard(e.card, msg, err.body);
        showBanner(msg);
        return;
      }
    }
  }
}

function updateSummary() {
  const cards = [...document.querySelectorAll("#results .result")];
  const n = cards.length;
  const anomalies = cards.filter((c) => c.dataset.decision === "anomaly").length;
  const errors = cards.filter((c) => c.dataset.decision === "error").length;
  const parts = [`${n} image${n === 1 ? "" : "s"}`, `${anomalies} flagged as anomalous`];
  if (errors) parts.push(`${errors} could not be scored`);
  $("#score-summary").textContent = n ? parts.join(" · ") : "";
}

/* ---------------------------------------------------------------- train -------------------------- */

function setupTrain() {
  const picked = (files) => {
    const all = [...files];
    state.trainFiles = all.filter((f) => IMAGE_EXT.test(f.name) || (f.type || "").startsWith("image/"));
    const skipped = all.length - state.trainFiles.length;
    const bytes = state.trainFiles.reduce((s, f) => s + f.size, 0);
    const folder = all[0]?.webkitRelativePath ? all[0].webkitRelativePath.split("/")[0] : null;
    const parts = [];
    parts.push(`${state.trainFiles.length} image${state.trainFiles.length === 1 ? "" : "s"} chosen (${fmtBytes(bytes)})`);
    if (folder) parts.push(`from folder “${folder}”`);
    if (skipped) parts.push(`${skipped} other file${skipped === 1 ? "" : "s"} ignored`);
    $("#train-picked").textContent = state.trainFiles.length ? parts.join(", ") + "." : "No images found in what was chosen.";
    if (folder && !$("#train-name").value) $("#train-name").value = folder.replace(/[^A-Za-z0-9._-]/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 64);
  };
  $("#train-folder").addEventListener("change", (e) => picked(e.target.files));
  $("#train-files").addEventListener("change", (e) => picked(e.target.files));
  $("#train-form").addEventListener("submit", (e) => { e.preventDefault(); startTraining(); });
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-use").addEventListener("click", () => {
    const r = jobResult(state.job);
    fetchModels().then(() => { fillModelSelect(r.name, r.version); showTab("score"); }).catch(() => showTab("score"));
  });
}

function formError(msg) {
  const p = $("#train-form-error");
  p.textContent = msg || "";
  p.hidden = !msg;
}

async function startTraining() {
  formError("");
  const name = $("#train-name").value.trim();
  if (!state.trainFiles.length) return formError("Choose a folder or some images of good parts first.");
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name) || name.includes("..")) {
    $("#train-name").focus();
    return formError("Give the model a name: 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit.");
  }
  const epochs = Number($("#train-epochs").value);
  if (!Number.isInteger(epochs) || epochs < 1) return formError("Epochs must be a whole number ≥ 1.");
  const fd = new FormData();
  for (const f of state.trainFiles) fd.append("files", f, f.name);
  fd.append("name", name);
  fd.append("method", $("#train-method").value);
  fd.append("backbone", $("#train-backbone").value);
  fd.append("image_size", $("#train-image-size").value);
  fd.append("epochs", String(epochs));
  for (const [id, field] of [["#train-batch-size", "batch_size"], ["#train-lr", "lr"], ["#train-seed", "seed"]]) {
    const v = $(id).value.trim();
    if (v !== "") fd.append(field, v);
  }
  fd.append("pretrained", $("#train-pretrained").checked ? "true" : "false");
  fd.append("activate", $("#train-activate").checked ? "true" : "false");
  const btn = $("#train-start");
  btn.disabled = true;
  const label = el("span", { text: ` Uploading ${state.trainFiles.length} images…` });
  btn.replaceChildren(el("span", { class: "spinner", "aria-hidden": "true" }), label);
  try {
    const res = await apiUpload("train", fd, (f) => {
      label.textContent = f < 1 ? ` Uploading ${state.trainFiles.length} images… ${Math.round(f * 100)} %` : " Checking the images…";
    });
    const id = res.job_id || res.id;
    localStorage.setItem(JOB_STORAGE, id);
    watchJob(id, res);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      formError("This server has no training endpoint (POST /train). Train with the CLI: stpm train …");
    } else if (err instanceof ApiError && err.code === "training_unavailable") {
      formError("Training is disabled on this server: " + err.message);
    } else if (err instanceof ApiError && err.status === 422 && Array.isArray(err.body.files)) {
      formError("Some files are not readable images — remove them and try again: " +
        err.body.files.map((f) => `${f.file} (${f.reason})`).join("; "));
    } else formError(explain(err, "Could not start training"));
  } finally {
    btn.disabled = false;
    btn.textContent = "Start training";
  }
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const jobId = (j) => j && (j.job_id || j.id);
const jobState = (j) => j && (j.state || j.status);
function jobResult(j) {
  return {
    name: (j && j.name) || null,
    version: (j && j.version) || null,
    ref: (j && (j.model || (j.version ? `${j.name}/${j.version}` : null))) || null,
  };
}

function watchJob(id, initial = null) {
  clearTimeout(state.pollTimer);
  // A poll already in flight for the previously watched job must not render over this one when its
  // answer arrives (clearTimeout cannot stop it): every watch gets a generation number.
  const gen = (state.watchGen = (state.watchGen || 0) + 1);
  state.job = initial ? { ...initial, job_id: id } : { job_id: id, state: "queued" };
  renderJob();
  const tick = async () => {
    try {
      const j = await api(`train/${encodeURIComponent(id)}`);
      if (gen !== state.watchGen) return;  // the user switched to another job meanwhile
      state.job = j;
      renderJob();
      if (TERMINAL.has(jobState(j))) {
        loadJobs();
        if (jobState(j) === "succeeded") { fetchModels().catch(() => {}); refreshStatus(); }
        return;
      }
    } catch (err) {
      if (gen !== state.watchGen) return;
      if (err instanceof ApiError && err.status === 404) {
        localStorage.removeItem(JOB_STORAGE);
        $("#job-error").textContent = "This job is no longer known to the server (restarted?).";
        $("#job-error").hidden = false;
        return;
      }
      $("#job-error").textContent = explain(err, "Lost contact with the job") + " — retrying…";
      $("#job-error").hidden = false;
    }
    state.pollTimer = setTimeout(tick, POLL_MS);
  };
  state.pollTimer = setTimeout(tick, initial ? 300 : 0);
}

function renderJob() {
  const j = state.job;
  $("#job-empty").hidden = !!j;
  $("#job").hidden = !j;
  if (!j) return;
  const st = jobState(j) || "queued";
  const p = j.progress || {};
  const r = jobResult(j);
  $("#job-title").textContent = `${r.name || "job"} · job ${String(jobId(j)).slice(0, 8)}`;
  $("#job-title").title = "Job id " + jobId(j);
  const pill = $("#job-state");
  pill.textContent = st;
  pill.className = "pill " + ({ succeeded: "ok", failed: "bad", cancelled: "warn", running: "info" }[st] || "");
  pill.dataset.state = st;

  // epoch: the epoch in progress (1-based) or done; step: batches done within it.
  let frac = 0;
  if (st === "succeeded") frac = 1;
  else if (p.epochs) {
    const e = p.epoch || 0;
    frac = p.steps && p.step != null && e > 0 ? ((e - 1) + Math.min(1, p.step / p.steps)) / p.epochs : e / p.epochs;
    frac = Math.max(0, Math.min(1, frac));
  }
  $("#job-progress-fill").style.width = (frac * 100).toFixed(1) + "%";
  const bar = $("#job-progressbar");
  bar.setAttribute("aria-valuenow", String(Math.round(frac * 100)));
  const phase = p.phase ? p.phase.charAt(0).toUpperCase() + p.phase.slice(1) : "Starting";
  let txt = {
    queued: j.queue_position ? `Queued (${j.queue_position === 1 ? "runs next" : "position " + j.queue_position})…` : "Queued…",
    running: p.epochs && p.phase === "training"
      ? `Training: epoch ${p.epoch ?? 0} of ${p.epochs}` + (p.steps ? `, step ${p.step ?? 0} of ${p.steps}` : "")
      : phase + "…",
    succeeded: "Done.",
    failed: "Training failed.",
    cancelled: "Cancelled.",
  }[st] || st;
  if (j.cancel_requested && !TERMINAL.has(st)) txt = "Cancelling… " + txt;
  $("#job-progress-text").textContent = txt;

  const stats = $("#job-stats");
  stats.replaceChildren();
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") stats.append(el("dt", { text: k }), el("dd", { text: String(v) })); };
  add("Images", j.n_images);
  if (p.epochs) add("Epoch", `${p.epoch ?? 0} / ${p.epochs}`);
  add("Loss", p.loss != null ? fmtNum(p.loss) : null);
  add("Validation loss", p.val_loss != null ? fmtNum(p.val_loss) + (p.best_val_loss != null && p.best_val_loss !== p.val_loss ? ` (best ${fmtNum(p.best_val_loss)})` : "") : null);
  if (st === "running") add("Time left", p.eta_s != null ? fmtDuration(p.eta_s) : "estimating…");
  const elapsed = TERMINAL.has(st) && j.started_at && j.finished_at
    ? (Date.parse(j.finished_at) - Date.parse(j.started_at)) / 1000 : p.elapsed_s;
  if (elapsed != null && !Number.isNaN(elapsed)) add("Elapsed", fmtDuration(elapsed));
  const mp = (j.params && j.params.model) || {};
  const tp = (j.params && j.params.train) || {};
  add("Settings", [mp.backbone, mp.image_size ? mp.image_size + " px" : null, tp.epochs ? tp.epochs + (tp.epochs === 1 ? " epoch" : " epochs") : null,
    mp.pretrained === false ? "random teacher" : null].filter(Boolean).join(" · ") || null);

  const errP = $("#job-error");
  if (j.error) {
    errP.textContent = j.error;
    errP.classList.toggle("note", st === "succeeded");  // on success: a note (e.g. could not activate)
    errP.hidden = false;
  } else if (st === "failed") {
    errP.textContent = "Training failed (no reason given; see the server log).";
    errP.hidden = false;
  } else errP.hidden = true;

  const res = $("#job-result");
  if (st === "succeeded") {
    if (res.dataset.job !== jobId(j)) {
      res.dataset.job = jobId(j);
      res.replaceChildren(
        el("p", {}, el("strong", { text: "Published " }), el("code", { text: r.ref || "?" }),
          j.activated ? " and made active." : " (not activated: activate it in the Models tab)."),
        el("div", { class: "calibration muted", text: "" }));
      if (r.name && r.version) showCalibration(r.name, r.version, $(".calibration", res));
    }
    res.hidden = false;
    $("#job-use").hidden = !r.name;
  } else { res.hidden = true; res.dataset.job = ""; $("#job-use").hidden = true; }
  $("#job-cancel").hidden = TERMINAL.has(st);
  $("#job-cancel").disabled = !!j.cancel_requested;
}

async function showCalibration(name, version, box) {
  try {
    const d = await api(`models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`);
    const cal = (d.manifest && d.manifest.calibration) || {};
    const parts = [];
    if (cal.threshold != null) parts.push(`threshold ${fmtNum(cal.threshold)} (raw)`);
    if (cal.n_images != null) parts.push(`calibrated on ${cal.n_images} held-out good image${cal.n_images === 1 ? "" : "s"}`);
    if (cal.expected_fpr != null) parts.push(`expected false-positive rate ${fmtPct(cal.expected_fpr)} on good parts`);
    if (cal.synthetic && cal.synthetic.recall != null) parts.push(`recall ${fmtNum(cal.synthetic.recall)} on synthetic anomalies`);
    if (d.backbone) parts.push(`${d.backbone} · ${d.image_size} px`);
    box.textContent = parts.join(" · ");
  } catch { /* the result line is enough */ }
}

async function cancelJob() {
  const id = jobId(state.job);
  if (!id) return;
  const ok = await confirmDialog("Cancel this training job?", "The job stops; nothing is published.", "Cancel job");
  if (!ok) return;
  try {
    const j = await api(`train/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (j && jobState(j) && jobId(state.job) === id) { state.job = j; renderJob(); }
    if (TERMINAL.has(jobState(j))) loadJobs();
  } catch (err) {
    showBanner(explain(err, "Could not cancel the job"));
  }
}

async function loadJobs() {
  const box = $("#jobs-list");
  let data;
  try {
    data = await api("train");
  } catch (err) {
    const noRoute = err instanceof ApiError && err.status === 404 && !err.code?.startsWith("job");
    if (noRoute || (err instanceof ApiError && err.code === "training_unavailable")) {
      state.trainAvailable = false;
      box.textContent = noRoute ? "This server has no training endpoint; train with the CLI (stpm train) instead."
        : "Training is disabled on this server: " + err.message;
      $("#train-start").disabled = true;
      return;
    }
    box.textContent = explain(err, "Could not list jobs");
    return;
  }
  state.trainAvailable = true;
  $("#train-start").disabled = false;
  const jobs = Array.isArray(data) ? data : (data.jobs || []);
  if (!jobs.length) { box.textContent = "No jobs yet."; return; }
  const rows = jobs.slice(0, 10).map((j) => {
    const r = jobResult(j);
    const st = jobState(j);
    return el("tr", { class: jobId(j) === jobId(state.job) ? "current" : null, "data-job": jobId(j), "data-name": r.name },
      el("td", {}, el("code", { text: String(jobId(j)).slice(0, 8), title: jobId(j) })),
      el("td", { text: r.name || "" }),
      el("td", {}, el("span", { class: "pill " + ({ succeeded: "ok", failed: "bad", cancelled: "warn", running: "info" }[st] || ""), text: st })),
      el("td", { text: r.version || "" }),
      el("td", {}, el("button", { type: "button", class: "ghost small", text: "Show", onclick: () => watchJob(jobId(j), j) })));
  });
  box.replaceChildren(el("div", { class: "table-wrap" }, el("table", {},
    el("thead", {}, el("tr", {}, ["Job", "Name", "State", "Version", ""].map((h) => el("th", { text: h })))),
    el("tbody", {}, rows))));
  // Resume watching the last job (or a running one) after a reload.
  if (!state.job) {
    const last = localStorage.getItem(JOB_STORAGE);
    const pick = jobs.find((j) => jobId(j) === last) || jobs.find((j) => !TERMINAL.has(jobState(j)));
    if (pick) watchJob(jobId(pick), pick);
  }
}

/* ---------------------------------------------------------------- models ------------------------- */

function fmtPct(x) {
  return x === null || x === undefined ? "—" : `${(100 * x).toFixed(x < 0.001 && x > 0 ? 2 : 1)} %`;
}

/* What the calibration promises (expected false-positive rate on good parts, recall on synthetic anomalies)
   beside what each recorded evaluation showed at the threshold (realised FPR on test/good, precision, recall),
   and at the thresholds other target rates would give (stpm eval's operating points). */
function decisionList(cal, metrics) {
  const items = [];
  if (cal) {
    const iv = cal.expected_fpr_interval;
    const target = cal.target_fpr != null ? `, target ${fmtPct(cal.target_fpr)}` : "";
    items.push(el("li", { title: `rule ${cal.rule}${target}; tail estimate ${cal.estimator || "none"}` },
      "expected FPR ", el("strong", { text: fmtPct(cal.expected_fpr) }),
      iv ? ` (${fmtPct(iv[0])}–${fmtPct(iv[1])})` : "", ` · ${cal.n_good_images} good`));
    if (cal.synthetic_recall != null) {
      items.push(el("li", {}, "synthetic recall ", el("strong", { text: fmtNum(cal.synthetic_recall) }),
        ` · ${cal.n_synthetic_images} images`));
    }
  }
  for (const [data, m] of Object.entries(metrics || {})) {
    const at = m && m.at_calibrated_threshold;
    if (!at) continue;
    items.push(el("li", { title: `measured by stpm eval on ${data}` }, `${data}: FPR `, el("strong", { text: fmtPct(at.fpr) }),
      " · P ", el("strong", { text: fmtNum(at.precision) }), " · R ", el("strong", { text: fmtNum(at.recall) })));
    const others = (m.operating_points || []).filter((p) => !p.current);
    if (others.length) {  // what `stpm calibrate MODEL --target-fpr T` would give on the same test set
      items.push(el("li", { class: "operating-points",
        title: `stpm calibrate MODEL --target-fpr T would set these thresholds from the recorded scores (no retraining); measured by stpm eval on ${data}` },
        `${data} at other targets: `, others.map((p) => `${fmtPct(p.target_fpr)} → FPR ${fmtPct(p.fpr_on_test_good)}, R ${fmtNum(p.recall)}`).join(" · ")));
    }
  }
  return items.length ? el("ul", { class: "metrics" }, items) : el("span", { class: "muted", text: "—" });
}

function metricsList(metrics) {
  const items = [];
  const walk = (obj, prefix, depth) => {
    for (const [k, v] of Object.entries(obj || {})) {
      if (k === "per_defect" || k === "data" || k === "evaluated_at") continue;
      if (typeof v === "number") items.push(el("li", {}, `${prefix}${k}: `, el("strong", { text: fmtNum(v) })));
      else if (v && typeof v === "object" && depth < 1) walk(v, `${prefix}${k} · `, depth + 1);
    }
  };
  walk(metrics, "", 0);
  return items.length ? el("ul", { class: "metrics" }, items) : el("span", { class: "muted", text: "—" });
}

async function loadModels() {
  const box = $("#models-list");
  try {
    await fetchModels();
  } catch (err) {
    box.replaceChildren(el("p", { class: "error-text", text: explain(err, "Could not list models") }));
    return;
  }
  if (!state.models.length) {
    box.replaceChildren(el("div", { class: "card empty" },
      el("p", { class: "big", text: "No models yet." }),
      el("p", {}, "Train one from a folder of good images in the ", el("a", { href: "#train", onclick: (e) => { e.preventDefault(); showTab("train"); }, text: "Train tab" }), ".")));
    return;
  }
  // a re-render (the page's two loads on opening #models, Refresh, an activation) keeps open panels open
  const open = [...box.querySelectorAll("section.model tr[data-version] details.version-details[open]")]
    .map((d) => [d.closest("section.model").dataset.model, d.closest("tr").dataset.version]);
  box.replaceChildren(...state.models.map(modelCard));
  for (const [name, version] of open) {
    const section = [...box.querySelectorAll("section.model")].find((s) => s.dataset.model === name);
    const row = section && [...section.querySelectorAll("tr[data-version]")].find((r) => r.dataset.version === version);
    const details = row && row.querySelector("details.version-details");
    if (details) details.open = true;  // its toggle listener loads the details again
  }
}

function modelCard(m) {
  const rows = [...m.versions].reverse().map((v) => {
    const details = el("details", { class: "version-details" }, el("summary", { text: "Calibration & manifest" }), el("div", { class: "muted", text: "loading…" }));
    details.addEventListener("toggle", () => { if (details.open && !details.dataset.loaded) loadVersionDetails(m.name, v.version, details); }, { once: false });
    return el("tr", { class: v.active ? "current" : null, "data-version": v.version },
      el("td", { "data-label": "Version" }, el("strong", { text: v.version }), " ",
        v.active ? el("span", { class: "pill ok", text: "active" }) : null, " ",
        v.loaded ? el("span", { class: "pill", text: "loaded", title: "In this server's memory" }) : null),
      el("td", { "data-label": "Created", text: fmtDate(v.created_at) }),
      el("td", { "data-label": "Backbone", text: [v.backbone, v.image_size ? v.image_size + " px" : null].filter(Boolean).join(" · ") || "—" }),
      el("td", { class: "num", "data-label": "Threshold (raw)", text: v.threshold != null ? fmtNum(v.threshold) : "—" }),
      el("td", { "data-label": "Decisions" }, decisionList(v.calibration, v.metrics)),
      el("td", { "data-label": "Metrics" }, v.metrics ? metricsList(v.metrics) : el("span", { class: "muted", text: "not evaluated" })),
      el("td", { class: "cell-actions" }, el("div", { class: "row-actions" },
        v.active ? null : el("button", { type: "button", class: "small", text: "Activate", title: "Load it, warm it up, then make it what “" + m.name + "” means", "aria-label": `Activate ${m.name}/${v.version}`, onclick: (e) => activateVersion(m.name, v.version, e.currentTarget) }),
        el("button", { type: "button", class: "danger small", text: "Delete", "aria-label": `Delete ${m.name}/${v.version}`, onclick: () => deleteVersion(m.name, v.version, v.active) })),
        details));
  });
  return el("section", { class: "card model", "data-model": m.name, "aria-label": `Model ${m.name}` },
    el("div", { class: "model-head" },
      el("h3", { text: m.name }),
      m.default ? el("span", { class: "pill info", text: "default", title: "Used by /score when no model is named" }) : null,
      el("span", { class: "muted", text: `${m.versions.length} version${m.versions.length === 1 ? "" : "s"} · active ${m.active_version || "—"}` }),
      el("span", { class: "spacer" }),
      el("button", { type: "button", class: "ghost small", text: "Score with it", onclick: () => { fillModelSelect(m.name, ""); showTab("score"); } })),
    el("div", { class: "table-wrap" }, el("table", { class: "stack" },
      el("thead", {}, el("tr", {}, ["Version", "Created", "Backbone", "Threshold (raw)", "Decisions", "Metrics", ""].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, rows))));
}

async function loadVersionDetails(name, version, details) {
  const body = details.lastElementChild;
  try {
    const d = await api(`models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`);
    details.dataset.loaded = "1";
    const man = d.manifest || {};
    const cal = man.calibration || {};
    const stats = cal.good_stats || {};
    const dl = el("dl", { class: "kv" });
    const add = (k, v) => { if (v !== undefined && v !== null) dl.append(el("dt", { text: k }), el("dd", { text: String(v) })); };
    add("Threshold (raw)", cal.threshold != null ? fmtNum(cal.threshold) : null);
    add("Maps to 0 (raw)", cal.low != null ? fmtNum(cal.low) : null);
    add("Rule", cal.method ? `${cal.method}${cal.method === "quantile" ? " q=" + cal.quantile : ""}${["max_margin", "quantile"].includes(cal.method) ? ", margin " + cal.margin : ""}` : null);
    const src = cal.source || {};
    add("Calibrated on", cal.n_images == null ? null : src.n_out_of_fold
      ? `${cal.n_images} good images: ${src.n_held_out} held out, ${src.n_out_of_fold} training images scored out of fold`
      : `${cal.n_images} held-out good images`);
    if (cal.target_fpr != null) add("Target FPR", fmtPct(cal.target_fpr));
    if (cal.expected_fpr != null) {
      const iv = cal.expected_fpr_interval;
      add("Expected FPR", `${fmtPct(cal.expected_fpr)}${iv ? ` (${Math.round(100 * (cal.interval_level || 0.9))} %: ${fmtPct(iv[0])}–${fmtPct(iv[1])})` : ""} · ${cal.estimator || ""}`);
    }
    if (cal.synthetic) add("Synthetic recall", `${fmtNum(cal.synthetic.recall)} of ${cal.synthetic.n_images} · ` + Object.entries(cal.synthetic.recall_by_kind || {}).map(([k, r]) => `${k} ${fmtNum(r)}`).join(" · "));
    if (cal.source && cal.source.kind) add("Calibration from", [cal.source.kind, cal.source.from, cal.source.images].filter(Boolean).join(" · "));
    if (cal.notes && cal.notes.length) add("Notes", cal.notes.join("; "));
    if (Object.keys(stats).length) add("Good scores", ["min", "median", "max"].filter((k) => k in stats).map((k) => `${k} ${fmtNum(stats[k])}`).join(" · "));
    const tr = man.training || {};
    const mo = man.model || {};
    const prior = man.position_prior;
    add("Image score", mo.image_score ? mo.image_score + (mo.image_score === "topk_mean" ? ` (top ${fmtNum(mo.topk)})` : "")
      + (prior && prior.grid ? ` · less a position prior (${prior.grid.join(" × ")} grid)` : "") : null);
    const pp = (tr.selection || {}).position_prior;
    if (pp && pp.synthetic_image_auroc_with != null) {
      add("Position prior", `${pp.chosen ? "kept" : "not kept"} (${pp.mode}): synthetic image AUROC ${fmtNum(pp.synthetic_image_auroc_without)} without, ${fmtNum(pp.synthetic_image_auroc_with)} with, from ${pp.n_images} out-of-fold images`);
    }
    const st = tr.settings;
    if (st && st.chosen) {
      const tried = (st.candidates || []).map((c) => `x${c.scale_factor} ${c.layers.join(",")} ${fmtNum(c.synthetic_image_auroc)}`).join(" · ");
      const out = (st.left_out || []).map((c) => `x${c.scale_factor} left out: ${c.why}`).join(" · ");
      add("Resolution", `x${st.chosen.scale_factor} the default scale, layers ${st.chosen.layers.join(",")} (${st.chosen.tiles_per_image} tile${st.chosen.tiles_per_image === 1 ? "" : "s"}${st.chosen.tile ? ` of ${st.chosen.tile} px` : ""} per image); synthetic image AUROC: ${tried}${out ? " · " + out : ""} (search ${st.mode === "auto" ? "auto, " : ""}${fmtNum(st.search_s)} s)`);
    }
    add("Training", ["epochs", "best_epoch", "batch_size", "lr"].filter((k) => tr[k] != null).map((k) => `${k} ${typeof tr[k] === "number" ? fmtNum(tr[k]) : tr[k]}`).join(" · ") || null);
    const data = man.data || {};
    add("Data", data.n_images != null ? `${data.n_images} images` : (data.n_train != null ? `${data.n_train} train / ${data.n_val ?? "?"} val` : null));
    body.replaceWith(el("div", {}, dl, el("details", {}, el("summary", { text: "manifest.json" }), el("pre", { text: JSON.stringify(man, null, 2) }))));
  } catch (err) {
    body.textContent = explain(err, "Could not load the manifest");
  }
}

async function activateVersion(name, version, btn) {
  btn.disabled = true;
  btn.replaceChildren(el("span", { class: "spinner", "aria-hidden": "true" }), " Loading…");
  try {
    await api(`models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/activate`, { method: "POST" });
    showBanner(`${name}/${version} is now active.`, "info");
    await loadModels();
    refreshStatus();
  } catch (err) {
    showBanner(explain(err, `Could not activate ${name}/${version}`));
    btn.disabled = false;
    btn.textContent = "Activate";
  }
}

async function deleteVersion(name, version, isActive) {
  const text = isActive
    ? `${name}/${version} is the ACTIVE version: requests for “${name}” will fail until you activate another version. Its files are removed for good.`
    : `The files of ${name}/${version} are removed for good.`;
  if (!(await confirmDialog(`Delete ${name}/${version}?`, text))) return;
  try {
    await api(`models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`, { method: "DELETE", query: { force: isActive ? "true" : null } });
    showBanner(`Deleted ${name}/${version}.`, "info");
  } catch (err) {
    if (err instanceof ApiError && err.status === 409 && !isActive) {
      if (await confirmDialog(`${name}/${version} is busy`, err.message + " Delete it anyway?", "Delete anyway")) {
        try {
          await api(`models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`, { method: "DELETE", query: { force: "true" } });
        } catch (err2) { showBanner(explain(err2, "Could not delete")); }
      }
    } else showBanner(explain(err, `Could not delete ${name}/${version}`));
  }
  await loadModels();
  refreshStatus();
}

/* ---------------------------------------------------------------- formatting --------------------- */

function fmtNum(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(3);
  return Number(x.toPrecision(4)).toString();
}
function fmtBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 ** 2) return (n / 1024).toFixed(0) + " KiB";
  return (n / 1024 ** 2).toFixed(1) + " MiB";
}
function fmtDuration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60), r = s % 60;
  if (m < 60) return `${m} min ${r} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}
function fmtDate(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/* ---------------------------------------------------------------- start -------------------------- */

async function refreshAll() {
  refreshStatus();
  try {
    await fetchModels();
  } catch (err) {
    fillModelSelect();
    if (err.status !== 401) showBanner(explain(err, "Could not list models"));
  }
  const current = $('[role="tab"][aria-selected="true"]').dataset.tab;
  if (current === "models") loadModels();
  if (current === "train") loadJobs();
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyDialog();
  $("#banner-close").addEventListener("click", hideBanner);
  setupScore();
  setupTrain();
  $("#models-refresh").addEventListener("click", loadModels);
  selectTab = setupTabs();
  refreshAll();
  setInterval(refreshStatus, 15000);
});
