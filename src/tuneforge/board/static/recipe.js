// The recipe builder: a form generated from the schema the server sends (/api/schema), checked as the user types
// (/api/recipe/check runs parse_recipe, the CLI's own validation), doctor and plan once the recipe is valid, the
// YAML view (edit, apply, download) and Launch.

import {api, banner, clear, debounce, el, fmt, option} from "./api.js";

const state = {spec: null, values: {}, extras: "", checkSeq: 0, lastCheck: null, slow: {busy: false, again: false},
  yamlEdited: false, dirty: false};

export async function initRecipe() {
  state.spec = await api("/api/schema");
  const gpus = document.getElementById("gpu-select");
  for (const gpu of state.spec.gpus) gpus.append(option(gpu, gpu));
  gpus.addEventListener("change", changed);
  document.getElementById("where").textContent = `runs: ${state.spec.runs_dir}`;
  renderForm();
  document.getElementById("launch").addEventListener("click", launch);
  document.getElementById("yaml-apply").addEventListener("click", applyYaml);
  document.getElementById("yaml-view").addEventListener("input", () => {  // the form no longer rewrites it
    state.yamlEdited = true;
    document.getElementById("yaml-note").textContent = "Edited here: \"Apply edits\" loads it into the form.";
  });
  document.getElementById("yaml-download").addEventListener("click", downloadYaml);
  if (!Object.keys(state.values).length) state.values = {name: "my-run"};
  setInputs();
  check();
}

function fieldInput(field) {
  const id = `field-${field.key.replace(/\./g, "-")}`;
  const common = {id, name: field.key, dataset: {key: field.key}};
  if (field.kind === "choice") {
    const select = el("select", common, option("", `default: ${field.default_text}`));
    for (const choice of field.choices) select.append(option(choice.value, choice.value));
    select.addEventListener("change", () => edited(field.key, select.value));
    return select;
  }
  const input = el("input", {...common, type: "text", autocomplete: "off", spellcheck: "false",
    placeholder: field.required ? "required" : (field.default_text === "null" ? "(none)" : field.default_text),
    class: field.kind === "yaml" ? "mono" : null, list: field.suggestions ? `${id}-list` : null});
  input.addEventListener("input", () => edited(field.key, input.value));
  return input;
}

function renderForm() {
  const root = clear(document.getElementById("recipe-form"));
  for (const section of state.spec.sections) {
    const box = el("details", {class: "section", open: section.open, dataset: {section: section.key}},
      el("summary", {}, el("span", {class: "section-title", text: section.title}),
        el("span", {class: "section-count", text: `${section.fields.length} keys`}),
        el("span", {class: "section-errors"})));
    if (section.help) box.append(el("p", {class: "muted small", text: section.help}));
    for (const field of section.fields) {
      const input = fieldInput(field);
      const meta = [field.required ? "required" : `default ${field.default_text}`, field.limits].filter(Boolean).join(" · ");
      const row = el("div", {class: "field", dataset: {key: field.key}},
        el("label", {for: input.id, text: field.key, class: "key"}), input,
        field.suggestions ? el("datalist", {id: `${input.id}-list`}, field.suggestions.map((s) => option(s, s))) : null,
        el("div", {class: "meta", text: meta}),
        el("div", {class: "help", text: field.help}),
        el("div", {class: "error"}), el("div", {class: "finding"}));
      box.append(row);
    }
    root.append(box);
  }
  const extras = el("textarea", {id: "field-extras", class: "mono", rows: 3, spellcheck: "false", dataset: {key: "extras"},
    placeholder: "keys the form has no field for (YAML), e.g. from a pasted recipe"});
  extras.addEventListener("input", () => { state.extras = extras.value; changed(); });
  root.append(el("details", {class: "section", dataset: {section: "extras"}},
    el("summary", {}, el("span", {class: "section-title", text: "Other keys (YAML)"}), el("span", {class: "section-errors"})),
    el("div", {class: "field", dataset: {key: "extras"}}, extras, el("div", {class: "error"}))));
}

function setInputs() {
  for (const input of document.querySelectorAll("#recipe-form [data-key]")) {
    if (input.classList.contains("field")) continue;
    input.value = input.dataset.key === "extras" ? state.extras : (state.values[input.dataset.key] ?? "");
  }
  if (state.extras) document.querySelector('[data-section="extras"]').open = true;
}

function edited(key, value) {
  if (value === "") delete state.values[key]; else state.values[key] = value;
  changed();
}

function changed() {
  document.getElementById("doctor-summary").dataset.fresh = "0";  // doctor and plan describe an older form now
  document.getElementById("recipe-status").dataset.current = "0";  // and so does the check, until it comes back
  state.dirty = true;
  scheduleCheck();
}

const scheduleCheck = debounce(check, 300);
const scheduleSlow = debounce(slowChecks, 1000);

async function check() {
  const seq = ++state.checkSeq;
  state.dirty = false;
  let result;
  try {
    result = await api("/api/recipe/check", {values: state.values, extras: state.extras});
  } catch (err) { banner(err.message); return; }
  if (seq !== state.checkSeq) return;  // a newer edit is on its way
  state.lastCheck = result;
  showCheck(result);
  if (!state.dirty) document.getElementById("recipe-status").dataset.current = "1";
  if (result.ok) scheduleSlow(); else clearSlow("Fix the recipe's problems first.");
}

function showCheck(result) {
  for (const node of document.querySelectorAll("#recipe-form .field")) {
    node.classList.remove("invalid");
    node.querySelector(".error").textContent = "";
  }
  for (const node of document.querySelectorAll("#recipe-form .section-errors")) node.textContent = "";
  for (const [key, messages] of Object.entries(result.errors)) {
    const row = key && document.querySelector(`#recipe-form .field[data-key="${CSS.escape(key)}"]`);
    if (!row) continue;  // a problem of the whole recipe: in the list beside the form
    row.classList.add("invalid");
    row.querySelector(".error").textContent = messages.join("\n");
    const section = row.closest("details");
    section.open = true;
    const count = section.querySelector(".section-errors");
    count.textContent = `${(parseInt(count.textContent) || 0) + messages.length} problem(s)`;
  }
  const status = document.getElementById("recipe-status");
  status.textContent = result.ok ? "valid" : `${result.problems.length} problem(s)`;
  status.className = `pill ${result.ok ? "ok" : "bad"}`;
  const list = clear(document.getElementById("recipe-problems"));
  for (const problem of result.problems) list.append(el("li", {text: problem}));
  document.getElementById("launch").disabled = !result.ok;
  document.getElementById("launch-note").textContent = result.ok
    ? `runs as: tuneforge train ${result.name}.yaml --output ${state.spec.runs_dir}/${result.name}` : "";
  if (!state.yamlEdited) document.getElementById("yaml-view").value = result.yaml;
}

function clearSlow(message) {
  document.getElementById("doctor-summary").textContent = message;
  clear(document.getElementById("doctor-findings"));
  clear(document.getElementById("plan-table")).textContent = message;
  for (const node of document.querySelectorAll("#recipe-form .finding")) node.textContent = "";
}

// doctor and plan load the tokenizer and read the data: at most one round in flight; results are shown only when the
// form still holds what they were computed for (else another round starts), and the panel is marked fresh.
const formKey = () => JSON.stringify([state.values, state.extras, document.getElementById("gpu-select").value]);

async function slowChecks() {
  if (state.slow.busy) { state.slow.again = true; return; }
  state.slow.busy = true;
  const key = formKey();
  const body = {values: state.values, extras: state.extras, gpu: document.getElementById("gpu-select").value || null};
  document.getElementById("doctor-summary").textContent = "doctor is checking the recipe and its data…";
  const [doctor, plan] = await Promise.allSettled([api("/api/recipe/doctor", body), api("/api/recipe/plan", body)]);
  state.slow.busy = false;
  const stale = state.slow.again || key !== formKey();
  state.slow.again = false;
  if (!(state.lastCheck && state.lastCheck.ok)) return;
  if (stale) { slowChecks(); return; }
  showDoctor(doctor);
  showPlan(plan);
  document.getElementById("doctor-summary").dataset.fresh = "1";
}

function showDoctor(outcome) {
  const summary = document.getElementById("doctor-summary");
  const list = clear(document.getElementById("doctor-findings"));
  for (const node of document.querySelectorAll("#recipe-form .finding")) node.textContent = "";
  if (outcome.status === "rejected") { summary.textContent = `doctor: ${outcome.reason.message}`; return; }
  summary.textContent = outcome.value.summary;
  for (const f of outcome.value.findings) {
    list.append(el("li", {class: `finding-item ${f.severity}`, dataset: {code: f.code}},
      el("div", {}, el("span", {class: `badge ${f.severity === "error" ? "bad" : f.severity === "warning" ? "warn" : "info"}`,
        text: f.severity}), " ", el("strong", {text: f.code}), " ", el("span", {class: "muted small", text: f.where})),
      el("div", {text: f.message}),
      el("div", {class: "small"}, el("span", {class: "muted", text: "why: "}), f.why),
      el("div", {class: "small"}, el("span", {class: "muted", text: "fix: "}), f.fix)));
    const row = f.field && document.querySelector(`#recipe-form .field[data-key="${CSS.escape(f.field)}"] .finding`);
    if (row) row.textContent = `${f.severity}: ${f.message}`;
  }
}

function showPlan(outcome) {
  const box = clear(document.getElementById("plan-table"));
  const head = document.getElementById("plan-gpu");
  if (outcome.status === "rejected") { box.textContent = `plan: ${outcome.reason.message}`; head.textContent = ""; return; }
  const p = outcome.value;
  head.textContent = `${p.gpu} (${fmt(p.gpu_gib, 3)} GiB)`;
  box.append(el("div", {class: "small muted", text: `${p.model}: ${fmt(p.params_b, 3)}B parameters; seq_len ${p.seq_len}, ` +
    `batch ${p.batch_size}, ${p.dtype}, gradient checkpointing ${p.gradient_checkpointing ? "on" : "off"}`}));
  const table = el("table", {class: "plan", id: "plan"}, el("thead", {}, el("tr", {},
    ["", "weights", "optim.", "activ.", "on GPU", "fits", "max batch", "time"].map((h) => el("th", {text: h})))));
  const body = el("tbody");
  for (const row of p.rows) {
    body.append(el("tr", {class: row.recipe ? "recipe-row" : null},
      el("td", {text: row.adapter + (row.recipe ? " (recipe)" : "")}),
      ...["weights", "optimizer_states", "activations", "on_gpu"].map((k) => el("td", {class: "num", text: gib(row[k])})),
      el("td", {}, el("span", {class: `badge ${row.fits ? "ok" : "bad"}`, text: row.fits ? "fits" : "no"})),
      el("td", {class: "num", text: row.max_batch}), el("td", {class: "num", text: row.time})));
  }
  table.append(body);
  box.append(table, el("div", {class: "small muted", text: "GiB, estimated (memory.py)."}));
  for (const note of p.notes) box.append(el("div", {class: "small warn-text", text: note}));
}

function gib(value) {
  return value < 0.01 ? "<0.01" : value < 10 ? value.toFixed(2) : value.toFixed(1);
}

async function launch() {
  const button = document.getElementById("launch");
  button.disabled = true;
  try {
    const result = await api("/api/recipe/launch", {values: state.values, extras: state.extras,
      overwrite: document.getElementById("launch-overwrite").checked});
    banner(`started: ${result.job.command}`, "info");
    location.hash = `#run/${encodeURIComponent(result.run)}`;
  } catch (err) {
    banner(err.message);
  } finally {
    button.disabled = !(state.lastCheck && state.lastCheck.ok);
  }
}

async function applyYaml() {
  try {
    const result = await api("/api/recipe/import", {yaml: document.getElementById("yaml-view").value});
    loadRecipe(result.values, result.extras);
    document.getElementById("yaml-note").textContent = "Applied: the form holds this recipe now.";
    banner("");
  } catch (err) { banner(err.message); }
}

function downloadYaml() {
  const text = document.getElementById("yaml-view").value;
  const name = (state.lastCheck && state.lastCheck.name) || "recipe";
  const link = el("a", {href: URL.createObjectURL(new Blob([text], {type: "application/yaml"})), download: `${name}.yaml`});
  document.body.append(link);
  link.click();
  setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
}

// Fill the form from a recipe (recommend, a run's recipe, pasted YAML).
export function loadRecipe(values, extras = "") {
  document.getElementById("doctor-summary").dataset.fresh = "0";
  document.getElementById("recipe-status").dataset.current = "0";
  state.values = {...values};
  state.extras = extras || "";
  state.yamlEdited = false;
  if (state.spec) { setInputs(); check(); }
}
