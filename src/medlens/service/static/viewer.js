// medlens web viewer: plain JavaScript, no build step, no network access beyond this server.
// The API key lives in sessionStorage (gone when the tab closes); every call sends it as a Bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("medlens-key") || "", recent: JSON.parse(sessionStorage.getItem("medlens-recent") || "[]"), urls: [] };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) { $("status").textContent = message; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: `Bearer ${state.key}` });
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

async function connect() {
  showError("");
  try {
    const models = await (await api("/v1/models")).json();
    const model = models.models[0];
    $("model").textContent = `Model ${model.model_id} · policy ${model.policy_hash} · threshold ${model.threshold.toFixed(3)} · ${model.class_names.join(" vs ")}`;
    const select = $("method");
    select.innerHTML = "";
    const names = { softmax: "single pass", mc: "MC dropout", tta: "test-time augmentation", ensemble: "deep ensemble" };
    for (const m of model.uncertainty_methods) {
      const option = document.createElement("option");
      option.value = m;
      option.textContent = names[m] || m;
      select.appendChild(option);
    }
    document.body.dataset.connected = "true";
    loadWorklist();
  } catch (e) {
    $("model").textContent = "Not connected.";
    showError(`Could not connect: ${e.message}`);
  }
}

async function imageUrl(id, alpha) {
  const blob = await (await api(`/v1/predictions/${encodeURIComponent(id)}/heatmap.png?alpha=${alpha}`)).blob();
  return URL.createObjectURL(blob);
}

function showResult(p) {
  $("result").hidden = false;
  // an input outside the model's validated domain gets no label: say why instead
  const assessable = p.in_domain !== false;
  $("label").textContent = assessable ? p.label : `not assessable: ${p.domain_reason}`;
  $("label").dataset.inDomain = String(p.in_domain);
  const refer = $("refer");
  refer.className = "badge " + (p.refer === true ? "refer" : p.refer === false ? "no-refer" : "unknown");
  refer.textContent = p.refer === true ? "Refer to a radiologist" : p.refer === false ? "No referral" : "Referral unknown";
  refer.dataset.refer = String(p.refer);
  $("refer-reason").textContent = p.refer_reason;
  $("positive-class").textContent = p.positive_class;
  $("probability").textContent = p.probability === null ? "none (the image could not be read)"
    : p.probability.toFixed(4) + (assessable ? "" : ` (${p.probability_note})`);
  $("threshold").textContent = p.threshold.toFixed(4);
  const u = p.uncertainty;
  $("unc-method").textContent = u.method;
  const decision = u.decision_entropy !== undefined ? `decision entropy ${u.decision_entropy.toFixed(4)}, ` : "";
  $("uncertainty").textContent = `${decision}predictive entropy ${u.predictive_entropy.toFixed(4)} nats, ` +
    `mutual information ${u.mutual_information.toFixed(4)}, ${u.passes} pass(es)`;
  $("model-id").textContent = p.policy_hash ? `${p.model_id} (policy ${p.policy_hash})` : p.model_id;
  $("prediction-id").textContent = p.id;
  $("gauge-fill").style.width = `${(100 * (p.probability || 0)).toFixed(1)}%`;
  $("gauge-threshold").style.left = `${(100 * p.threshold).toFixed(1)}%`;
}

async function showImages(id, assessable = true) {
  const ticket = (state.ticket = (state.ticket || 0) + 1);  // only the latest request may show its images
  try {
    // no heat map for an input the model cannot assess: an explanation of a meaningless call would mislead
    const [base, heat] = await Promise.all([imageUrl(id, 0), imageUrl(id, assessable ? 1 : 0)]);
    if (ticket !== state.ticket) { URL.revokeObjectURL(base); URL.revokeObjectURL(heat); return; }
    for (const url of state.urls.splice(0)) if (url !== base && url !== heat) URL.revokeObjectURL(url);
    state.urls.push(base, heat);
    $("image-base").src = base;
    $("heatmap-overlay").src = heat;
    $("heatmap-overlay").hidden = !assessable;
    $("viewer").hidden = false;
    applyOpacity();
  } catch (e) {
    $("viewer").hidden = true;
    showError(`Heat map unavailable: ${e.message}`);
  }
}

function applyOpacity() {
  const value = Number($("opacity").value);
  $("heatmap-overlay").style.opacity = String(value / 100);
  $("opacity-value").textContent = `${value}%`;
}

function remember(p, name) {
  const label = p.in_domain === false ? "not assessable" : p.label;
  state.recent = [{ id: p.id, name, label, probability: p.probability, refer: p.refer, created: p.created }]
    .concat(state.recent.filter((r) => r.id !== p.id)).slice(0, 20);
  sessionStorage.setItem("medlens-recent", JSON.stringify(state.recent));
  renderRecent();
}

function renderRecent() {
  const list = $("recent");
  list.innerHTML = "";
  for (const r of state.recent) {
    const item = document.createElement("li");
    item.textContent = `${r.name}: ${r.label} (p = ${r.probability.toFixed(3)})${r.refer ? " · REFER" : ""}`;
    item.title = `${r.id} · ${r.created}`;
    item.addEventListener("click", () => open(r.id));
    list.appendChild(item);
  }
}

async function open(id) {
  showError("");
  try {
    const p = await (await api(`/v1/predictions/${encodeURIComponent(id)}`)).json();
    showResult(p);
    if (p.source === "dicom") {
      // a study the DICOM node received: its heat map is the Secondary Capture sent to the PACS (one picture)
      $("viewer").hidden = true;
      if (p.results && p.results.sc) await showImages(id, false);
    } else {
      await showImages(id, p.in_domain !== false);
    }
  } catch (e) {
    showError(e.message);
  }
}

function waiting(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function loadWorklist() {
  if (!state.key) return;
  try {
    const data = await (await api("/v1/worklist?hours=24")).json();
    const body = $("worklist-body");
    body.innerHTML = "";
    for (const s of data.studies) {
      const row = document.createElement("tr");
      row.dataset.priority = s.priority;
      row.dataset.prediction = s.predictions[0];
      const cells = [s.priority, s.probability === null ? "\u2014" : s.probability.toFixed(3), waiting(s.waiting_s),
        s.modality ? `DICOM ${s.modality}` : "upload"];
      for (const text of cells) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.appendChild(cell);
      }
      row.title = s.reason || `${s.predictions.length} image(s)`;
      row.addEventListener("click", () => open(s.predictions[0]));
      body.appendChild(row);
    }
  } catch (e) {
    showError(`Worklist unavailable: ${e.message}`);
  }
}

async function upload(file) {
  if (!state.key) { showError("Enter an API key first."); return; }
  showError("");
  setStatus(`Analysing ${file.name} ...`);
  const form = new FormData();
  form.append("file", file);
  try {
    const method = $("method").value || "softmax";
    const p = await (await api(`/v1/predictions?uncertainty=${encodeURIComponent(method)}`, { method: "POST", body: form })).json();
    showResult(p);
    remember(p, file.name);
    await showImages(p.id, p.in_domain !== false);
    setStatus(`${file.name}: done.`);
    loadWorklist();
  } catch (e) {
    setStatus("");
    showError(`${file.name}: ${e.message}`);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("medlens-key", state.key);
  connect();
});
$("file-input").addEventListener("change", (event) => { if (event.target.files[0]) upload(event.target.files[0]); });
$("opacity").addEventListener("input", applyOpacity);
$("worklist-refresh").addEventListener("click", loadWorklist);
const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  if (event.dataTransfer.files[0]) upload(event.dataTransfer.files[0]);
});
renderRecent();
if (state.key) { $("api-key").value = state.key; connect(); }
