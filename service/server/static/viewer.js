// scancache viewer: plain JS over the REST API (no libraries, works offline).
"use strict";

const state = { scan: null, meta: null, objectUrl: null, request: 0 };
const $ = (id) => document.getElementById(id);

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) {
    let detail = response.status + " " + response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

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
      item.addEventListener("click", () => selectScan(scan.scan_id));
      list.appendChild(item);
    }
    $("count").textContent = body.scans.length + " scans";
    showError(null);
  } catch (err) {
    $("count").textContent = "";
    showError(err);
  }
}

const AXIS_INDEX = { y: 0, x: 1, z: 2 };

function setSliderRange() {
  const size = state.meta.shape[AXIS_INDEX[$("axis").value]];
  const slider = $("slice");
  slider.max = String(size - 1);
  slider.value = String(Math.floor(size / 2));
  $("slice-value").textContent = slider.value;
}

async function selectScan(scanId) {
  try {
    state.meta = await (await api("scans/" + encodeURIComponent(scanId))).json();
  } catch (err) { showError(err); return; }
  state.scan = scanId;
  for (const li of $("scans").children) li.classList.toggle("selected", li.dataset.scanId === scanId);
  $("view").hidden = false;
  $("title").textContent = scanId;
  const hasMask = state.meta.num_classes > 0;
  document.querySelector("input[name=overlay][value=mask]").disabled = !hasMask;
  document.querySelector("input[name=overlay][value=prediction]").disabled = !state.meta.has_prediction;
  const current = document.querySelector("input[name=overlay]:checked");
  if (current.disabled) document.querySelector("input[name=overlay][value=none]").checked = true;
  renderDice(state.meta.prediction_dice);
  setSliderRange();
  await draw();
}

function renderDice(dice) {
  const body = $("dice").querySelector("tbody");
  body.replaceChildren();
  $("dice").hidden = !dice;
  for (const [k, d] of (dice || []).entries()) {
    const row = document.createElement("tr");
    row.innerHTML = "<td></td><td></td>";
    row.children[0].textContent = String(k);
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
  const img = $("preview");
  img.dataset.loading = "true";
  try {
    const blob = await (await api("scans/" + encodeURIComponent(state.scan) + "/preview.png?" + params)).blob();
    if (request !== state.request) return;
    const url = URL.createObjectURL(blob);
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = url; });
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = url;
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
for (const radio of document.querySelectorAll("input[name=overlay]")) radio.addEventListener("change", draw);
$("token").value = sessionStorage.getItem("scancache-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("scancache-token", $("token").value); listScans(); });
listScans();
