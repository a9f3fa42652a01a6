// brainscan page: sends each chosen file to /api/analyze and draws the answers.
// Research use only. Not a medical device.
"use strict";

// configReady: the /api/config answer, which a file dropped before it arrives waits for.
const state = { files: [], config: null, configReady: null, slices: [], objectUrls: [] };
const $ = (selector, root = document) => root.querySelector(selector);

const fixed3 = (value) => Number(value).toFixed(3);
const megabytes = (bytes) => `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
const labelText = (label) => label.replaceAll("_", " ");

function areaText(result) {
  const seg = result.segmentation;
  if (seg) {
    const mm2 = seg.area_mm2 === null ? " (no pixel spacing in the file, so no mm²)" : ` (${seg.area_mm2.toFixed(1)} mm²)`;
    return `${seg.area_px} px${mm2}`;
  }
  if (result.segmentation_ran) return "0 px: the mask is empty";
  return result.tumor_detected ? "not run (segmentation switched off)" : "not run (no tumor seen, so the gate skipped it)";
}

function stripAreaText(result) {
  if (result.scope && !result.scope.assessed) return "not judged";
  const seg = result.segmentation;
  if (seg) return seg.area_mm2 === null ? `${seg.area_px} px` : `${seg.area_mm2.toFixed(1)} mm²`;
  return result.tumor_detected ? "tumor, no mask" : "no tumor";
}

// The gateway's scope verdict: "assessed", or "could not judge" and why (never read as "no tumor").
function scopeView(scope) {
  if (!scope) return null;
  if (scope.assessed) {
    const p = scope.in_scope_probability;
    return { assessed: true, text: p === null || p === undefined ? "Assessed" : `Assessed (p(in scope) = ${fixed3(p)})` };
  }
  return { assessed: false, text: `Could not judge: ${scope.detail || scope.reason}` };
}

function showMessage(text, kind) {
  const message = document.createElement("p");
  message.className = "message";
  message.dataset.kind = kind || "error";
  message.textContent = text;
  $("#messages").append(message);
}

function setGatewayStatus(text, down) {
  const status = $("#gateway-status");
  status.textContent = text;
  status.classList.toggle("down", down);
}

async function checkGateway() {
  try {
    const response = await fetch("/api/gateway");
    const body = await response.json();
    if (response.ok) {
      const models = body.models.map((m) => `${m.role === m.name ? m.name : `${m.role} ${m.name}`} v${m.version}`).join(", ");
      setGatewayStatus(`Gateway ${state.config.server} (${body.backend}): ${models}`, false);
    } else {
      setGatewayStatus(body.error.message, true);
    }
  } catch {
    setGatewayStatus("The page's own server is not answering; is `brainscan web` still running?", true);
  }
}

function clearResults() {
  $("#messages").replaceChildren();
  $("#results").replaceChildren();
  $("#strip").replaceChildren();
  $("#strip-section").hidden = true;
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
  state.slices = [];
}

function options() {
  const flag = (id) => ($(id).checked ? "true" : "false");
  return `segment=${flag("#opt-segment")}&detect=${flag("#opt-detect")}&gate=${flag("#opt-gate")}`;
}

async function analyzeFile(file) {
  const pageDown = { error: { kind: "page_down", message: "The page's own server did not answer; is `brainscan web` still running?" } };
  let config;
  try {
    config = await state.configReady;
  } catch {
    return pageDown;
  }
  if (file.size > config.max_upload_bytes) {
    return { error: { kind: "too_big", message: `The file is ${megabytes(file.size)}; the gateway accepts at most ${megabytes(config.max_upload_bytes)} per file.` } };
  }
  try {
    const response = await fetch(`/api/analyze?${options()}`, {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
    const body = await response.json();
    return response.ok ? body : { error: body.error || { kind: "server_error", message: `HTTP ${response.status}` } };
  } catch {
    return pageDown;
  }
}

async function analyzeFiles(files) {
  clearResults();
  state.files = files;
  $("#rerun").disabled = true;
  let refused = 0;
  for (const [index, file] of files.entries()) {
    $("#progress").textContent = `Analyzing ${file.name} (${index + 1} of ${files.length})…`;
    const answer = await analyzeFile(file);
    if (answer.error) {
      refused += 1;
      showMessage(`${file.name}: ${answer.error.message}`, answer.error.kind);
      if (answer.error.kind === "gateway_down" || answer.error.kind === "token_refused") {
        setGatewayStatus(answer.error.message, true);
      }
      continue;
    }
    for (const slice of answer.slices) addSlice(file.name, slice, answer.slices.length > 1);
  }
  const analyzed = state.slices.length;
  $("#progress").textContent = `Done: ${analyzed} slice${analyzed === 1 ? "" : "s"} analyzed` +
    (refused ? `, ${refused} file${refused === 1 ? "" : "s"} refused.` : ".");
  renderStrip();
  $("#rerun").disabled = files.length === 0;
}

function addSlice(fileName, slice, multiFrame) {
  const index = state.slices.length;
  const result = slice.result;
  const title = multiFrame ? `${fileName}, frame ${slice.frame + 1}` : fileName;
  const stem = fileName.replace(/\.[^.]*$/, "") + (multiFrame ? `-frame${slice.frame + 1}` : "");
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  card.id = `slice-${index}`;
  card.setAttribute("aria-labelledby", `slice-${index}-title`);
  const heading = $(".result-title", card);
  heading.id = `slice-${index}-title`;
  heading.textContent = title;

  $(".original", card).src = slice.original_png;
  $(".original", card).alt = `Original slice ${title}`;
  $(".overlay", card).src = slice.overlay_png;
  $(".overlay", card).alt = `Overlay of ${title}: U-Net mask in red, Mask R-CNN boxes in yellow`;

  $(".label", card).textContent = labelText(result.label);
  const scope = scopeView(result.scope);
  $(".tumor", card).textContent = scope && !scope.assessed ? "Not judged (see Scope)"
    : `${result.tumor_detected ? "Yes" : "No"}, p(tumor) = ${fixed3(result.tumor_probability)}`;
  if (scope) {
    $(".scope", card).textContent = scope.text;
    $(".scope", card).classList.toggle("not-judged", !scope.assessed);
  } else {  // a gateway or SDK without the scope verdict
    $(".scope", card).previousElementSibling.remove();
    $(".scope", card).remove();
  }
  $(".mask-area", card).textContent = areaText(result);

  const probabilities = $(".probabilities tbody", card);
  for (const [name, value] of Object.entries(result.probabilities)) {
    const row = probabilities.insertRow();
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = labelText(name);
    row.append(head);
    const meter = document.createElement("meter");
    Object.assign(meter, { min: 0, max: 1, value });
    meter.setAttribute("aria-label", `p(${labelText(name)})`);
    row.insertCell().append(meter);
    Object.assign(row.insertCell(), { className: "number", textContent: fixed3(value) });
  }

  const instances = $(".instances tbody", card);
  result.instances.forEach((instance, i) => {
    const row = instances.insertRow();
    const cells = [String(i + 1), instance.box.map((v) => v.toFixed(0)).join(", "), fixed3(instance.score),
      String(instance.area_px), instance.area_mm2 === null ? "–" : instance.area_mm2.toFixed(1)];
    for (const text of cells) Object.assign(row.insertCell(), { className: "number", textContent: text });
  });
  if (result.instances.length === 0) {
    const cell = instances.insertRow().insertCell();
    cell.colSpan = 5;
    cell.textContent = result.detection_ran ? "none found" : "not run";
  }

  const overlayLink = $(".download-overlay", card);
  overlayLink.href = slice.overlay_png;
  overlayLink.download = `${stem}.overlay.png`;
  overlayLink.setAttribute("aria-label", `Download the overlay PNG of ${title}`);
  const json = new Blob([JSON.stringify({ image: fileName, ...result }, null, 2)], { type: "application/json" });
  const jsonUrl = URL.createObjectURL(json);
  state.objectUrls.push(jsonUrl);
  const jsonLink = $(".download-json", card);
  jsonLink.href = jsonUrl;
  jsonLink.download = `${stem}.json`;
  jsonLink.setAttribute("aria-label", `Download the JSON of ${title}`);

  $("#results").append(card);
  state.slices.push({ title, slice, card });
}

function renderStrip() {
  const strip = $("#strip");
  strip.replaceChildren();
  $("#strip-section").hidden = state.slices.length < 2;
  for (const { title, slice, card } of state.slices) {
    const button = document.createElement("button");
    button.type = "button";
    button.classList.toggle("tumor", slice.result.tumor_detected);
    button.setAttribute("aria-controls", card.id);
    const thumbnail = document.createElement("img");
    thumbnail.src = slice.overlay_png;
    thumbnail.alt = "";
    const name = Object.assign(document.createElement("span"), { className: "slice-name", textContent: title });
    const area = Object.assign(document.createElement("span"), { className: "slice-area", textContent: stripAreaText(slice.result) });
    button.append(thumbnail, name, area);
    button.addEventListener("click", () => {
      card.scrollIntoView({ block: "start" });
      card.focus({ preventScroll: true });
    });
    const item = document.createElement("li");
    item.append(button);
    strip.append(item);
  }
}

function wireInputs() {
  const input = $("#file-input");
  input.addEventListener("change", () => {
    if (input.files.length) analyzeFiles([...input.files]);
  });
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) analyzeFiles([...event.dataTransfer.files]);
  });
  $("#rerun").addEventListener("click", () => analyzeFiles(state.files));
}

async function start() {
  state.configReady = fetch("/api/config").then((response) => response.json());
  wireInputs();  // a file chosen before the config arrives waits for it in analyzeFile
  try {
    state.config = await state.configReady;
  } catch {
    setGatewayStatus("The page's own server is not answering.", true);
    return;
  }
  $("#disclaimer").textContent = state.config.disclaimer;
  $("#size-limit").textContent = `Up to ${megabytes(state.config.max_upload_bytes)} per file (the gateway's limit). ` +
    "Files stay in memory and are sent only to the gateway.";
  await checkGateway();
}

document.addEventListener("DOMContentLoaded", start);
