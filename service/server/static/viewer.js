// scancache viewer: plain JS over the REST API (no libraries, works offline).
"use strict";

const state = { scan: null, meta: null, objectUrl: null, request: 0, window: null, colors: [] };
const $ = (id) => document.getElementById(id);

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) {
    let detail = response.status + " " + response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new ApiError(detail, response.status);
  }
  return response;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

// A 401 is not an empty store: say so where the list would be, and point at the token field.
function showAuth(err) {
  const box = $("auth");
  const unauthorized = Boolean(err && err.status === 401);
  box.hidden = !unauthorized;
  $("token").setAttribute("aria-invalid", unauthorized ? "true" : "false");
  if (!unauthorized) { box.textContent = ""; return false; }
  box.textContent = $("token").value.trim()
    ? "The server did not accept this token: check it in the token field above (" + err.message + ")."
    : "This server needs a token: type it into the token field above (" + err.message + ").";
  return true;
}

// The server sends a non-finite Dice as null (strict JSON).
function diceText(d) {
  return typeof d === "number" ? d.toFixed(3) : "n/a";
}

function formatDice(dice) {
  if (!dice) return "";
  return "Dice " + dice.map(diceText).join(" / ");
}

async function listScans(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams();
  for (const [key, value] of new FormData($("filters"))) {
    if (value !== "") params.append(key, value);
  }
  const list = $("scans");
  try {
    const body = await (await api("scans?" + params.toString())).json();
    list.replaceChildren();
    for (const scan of body.scans) {
      const item = document.createElement("li");
      item.dataset.scanId = scan.scan_id;
      item.innerHTML = "<div class=id></div><div class=meta></div>";
      item.querySelector(".id").textContent = scan.scan_id;
      const bits = [scan.split, scan.shape.join("x"), scan.has_prediction ? "prediction" : "", formatDice(scan.prediction_dice)];
      item.querySelector(".meta").textContent = bits.filter(Boolean).join(" · ");
      // a keyboard reaches it too: Tab to it, Enter or Space opens it (as a button would)
      item.tabIndex = 0;
      item.setAttribute("role", "button");
      item.addEventListener("click", () => selectScan(scan.scan_id));
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); selectScan(scan.scan_id); }
      });
      list.appendChild(item);
    }
    $("count").textContent = body.scans.length + " scans";
    showAuth(null);
    showError(null);
  } catch (err) {
    list.replaceChildren();
    $("count").textContent = "";
    if (!showAuth(err)) showError(err);
  }
}

const AXIS_INDEX = { y: 0, x: 1, z: 2 };

// Voxel size in mm along the stored axes (y, x, z); 1 mm where the scan has none.
function spacing() {
  const found = state.meta && state.meta.spacing;
  const ok = Array.isArray(found) && found.length === 3 && found.every((s) => typeof s === "number" && s > 0);
  return ok ? found : [1, 1, 1];
}

function setSliderRange() {
  const size = state.meta.shape[AXIS_INDEX[$("axis").value]];
  const slider = $("slice");
  slider.max = String(size - 1);
  slider.value = String(Math.floor(size / 2));
  $("slice-value").textContent = slider.value;
}

// -- window / level ---------------------------------------------------------------------------
// The server's default window: mean +- 3 std of the scan's statistics, within [min, max].
function defaultWindow(intensity) {
  const { min, max, mean, std } = intensity;
  const lo = Math.max(min, mean - 3 * std), hi = Math.min(max, mean + 3 * std);
  return lo < hi ? [lo, hi] : [min, max > min ? max : min + 1];
}

function number(x) { return Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3); }

function setWindowControls() {
  const intensity = state.meta.intensity || {};
  const usable = ["min", "max", "mean", "std"].every((k) => typeof intensity[k] === "number");
  $("window").disabled = !usable;
  state.window = null;  // "auto": the server's default window, until the user moves a slider
  if (!usable) { $("level-value").textContent = $("width-value").textContent = "n/a"; return; }
  const span = Math.max(intensity.max - intensity.min, 1e-6);
  const [lo, hi] = defaultWindow(intensity);
  const level = $("level"), width = $("width");
  level.min = String(intensity.min); level.max = String(intensity.max);
  width.min = String(span / 1000); width.max = String(2 * span);
  level.value = String((lo + hi) / 2); width.value = String(hi - lo);
  showWindow();
}

function showWindow() {
  $("level-value").textContent = number(Number($("level").value));
  $("width-value").textContent = number(Number($("width").value));
}

function windowChanged() {
  const level = Number($("level").value), width = Number($("width").value);
  state.window = [level - width / 2, level + width / 2];
  showWindow();
  draw();
}

// -- legend -----------------------------------------------------------------------------------
function legendNames(overlay) {
  const meta = state.meta;
  if (overlay === "mask") {
    const names = Array.isArray(meta.class_names) ? meta.class_names : [];
    return Array.from({ length: meta.num_classes }, (_, k) => names[k] || "class " + k);
  }
  if (overlay === "prediction") {
    const names = Array.isArray(meta.prediction_class_names) ? meta.prediction_class_names : [];
    const count = names.length || (meta.prediction_dice ? meta.prediction_dice.length : meta.num_classes);
    return Array.from({ length: count }, (_, k) => names[k] || "category " + k);
  }
  return [];
}

function renderLegend(overlay) {
  const legend = $("legend");
  legend.replaceChildren();
  legend.hidden = overlay === "none";
  for (const [k, name] of legendNames(overlay).entries()) {
    const rgb = state.colors.length ? state.colors[k % state.colors.length] : [128, 128, 128];
    const item = document.createElement("li");
    item.innerHTML = "<span class=swatch></span><span class=name></span>";
    item.querySelector(".swatch").style.background = "rgb(" + rgb.join(",") + ")";
    item.querySelector(".name").textContent = name;
    item.dataset.label = String(k + 1);
    legend.appendChild(item);
  }
}

async function loadColors() {
  try { state.colors = await (await fetch("viewer/static/colors.json")).json(); } catch (e) { state.colors = []; }
}

// -- the picture ------------------------------------------------------------------------------
// The PNG has one pixel per voxel (times the zoom); the page stretches it so that a pixel is as
// many millimetres high and wide as its voxel: planes through y or x (z across) keep their
// physical aspect however thick the slices are. Those planes are also turned a quarter to the
// left, so that z runs upwards: for scans stored (P, L, S), as NIfTI scans are, superior is up
// as radiologists view a coronal or sagittal plane (the PNG itself keeps the REST layout).
function fitAspect(img) {
  const axis = AXIS_INDEX[$("axis").value];
  const along = [0, 1, 2].filter((a) => a !== axis);  // the PNG's (rows, columns)
  const mm = spacing();
  const [rowMm, colMm] = along.map((a) => mm[a]);
  const unit = Math.min(rowMm, colMm);
  const height = img.naturalHeight * rowMm / unit;
  const width = img.naturalWidth * colMm / unit;
  img.style.height = height + "px";
  img.style.width = width + "px";
  const frame = img.parentElement;
  const names = along.map((a) => "yxz"[a]);
  if (axis === 2) {
    img.style.transform = "";
    frame.style.width = width + "px";
    frame.style.height = height + "px";
    $("aspect").textContent = "rows " + names[0] + " (" + rowMm + " mm), columns " + names[1] + " (" + colMm + " mm)";
  } else {
    // rotate about the top-left corner, then move the turned picture back into its frame
    img.style.transformOrigin = "0 0";
    img.style.transform = "translate(0, " + width + "px) rotate(-90deg)";
    frame.style.width = height + "px";
    frame.style.height = width + "px";
    $("aspect").textContent = "rows z upwards (" + colMm + " mm), columns " + names[0] + " (" + rowMm + " mm)";
  }
}

async function selectScan(scanId) {
  try {
    state.meta = await (await api("scans/" + encodeURIComponent(scanId))).json();
  } catch (err) { showError(err); return; }
  state.scan = scanId;
  for (const li of $("scans").children) {
    li.classList.toggle("selected", li.dataset.scanId === scanId);
    li.setAttribute("aria-pressed", String(li.dataset.scanId === scanId));
  }
  $("view").hidden = false;
  $("title").textContent = scanId;
  const hasMask = state.meta.num_classes > 0;
  document.querySelector("input[name=overlay][value=mask]").disabled = !hasMask;
  document.querySelector("input[name=overlay][value=prediction]").disabled = !state.meta.has_prediction;
  const current = document.querySelector("input[name=overlay]:checked");
  if (current.disabled) document.querySelector("input[name=overlay][value=none]").checked = true;
  renderDice(state.meta.prediction_dice);
  setSliderRange();
  setWindowControls();
  await draw();
}

function renderDice(dice) {
  const body = $("dice").querySelector("tbody");
  body.replaceChildren();
  $("dice").hidden = !dice;
  const names = legendNames("prediction");
  for (const [k, d] of (dice || []).entries()) {
    const row = document.createElement("tr");
    row.innerHTML = "<td></td><td></td>";
    row.children[0].textContent = names[k] || String(k);
    row.children[1].textContent = diceText(d);
    body.appendChild(row);
  }
}

async function draw() {
  if (!state.scan) return;
  const request = ++state.request;  // a newer slider position wins over slower older ones
  const overlay = document.querySelector("input[name=overlay]:checked").value;
  const params = new URLSearchParams({
    z: $("slice").value, axis: $("axis").value, overlay: overlay, scale: $("scale").value,
  });
  if (state.window) params.set("window", state.window.join(","));
  renderLegend(overlay);
  const img = $("preview");
  img.dataset.loading = "true";
  try {
    const blob = await (await api("scans/" + encodeURIComponent(state.scan) + "/preview.png?" + params)).blob();
    if (request !== state.request) return;
    const url = URL.createObjectURL(blob);
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = url; });
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = url;
    fitAspect(img);
    img.dataset.shown = params.toString();
    showError(null);
  } catch (err) {
    if (request === state.request) showError(err);
  } finally {
    if (request === state.request) img.dataset.loading = "false";
  }
}

$("filters").addEventListener("submit", listScans);
$("slice").addEventListener("input", () => { $("slice-value").textContent = $("slice").value; draw(); });
$("axis").addEventListener("change", () => { setSliderRange(); draw(); });
$("scale").addEventListener("change", draw);
$("level").addEventListener("input", windowChanged);
$("width").addEventListener("input", windowChanged);
$("window-reset").addEventListener("click", () => { setWindowControls(); draw(); });
for (const radio of document.querySelectorAll("input[name=overlay]")) radio.addEventListener("change", draw);
$("token").value = sessionStorage.getItem("scancache-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("scancache-token", $("token").value); listScans(); });
loadColors().then(listScans);
