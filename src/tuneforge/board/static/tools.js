// Chat (base vs tuned on one prompt) and Deploy (merge / export / serve buttons whose forms come from the commands'
// own options, and the jobs they start).

import {api, badge, banner, clear, el, fillRunSelect, option} from "./api.js";

// ---- chat -----------------------------------------------------------------------------------------------------
export async function showChat() {
  await fillRunSelect(document.getElementById("chat-run"));
}

export async function sendChat() {
  const run = document.getElementById("chat-run").value;
  const note = document.getElementById("chat-note");
  const out = clear(document.getElementById("chat-answers"));
  if (!run) { banner("chat: no finished run to talk to yet"); return; }
  const button = document.getElementById("chat-send");
  button.disabled = true;
  note.textContent = "loading the models and generating…";
  try {
    const result = await api("/api/chat", {run, prompt: document.getElementById("chat-prompt").value,
      system: document.getElementById("chat-system").value || null,
      max_new_tokens: parseInt(document.getElementById("chat-max").value) || 64});
    out.append(
      el("div", {class: "answer", id: "answer-base"}, el("div", {class: "label", text: result.base_label}),
        el("div", {class: "text", text: shown(result.base)})),
      el("div", {class: "answer", id: "answer-tuned"}, el("div", {class: "label", text: `tuned: ${result.run}`}),
        el("div", {class: "text", text: shown(result.tuned)})),
      el("details", {class: "full"}, el("summary", {text: "the prompt both models saw (chat template applied)"}),
        el("pre", {class: "mono", text: result.prompt})));
    note.textContent = "";
  } catch (err) {
    note.textContent = "";
    banner(err.message);
  } finally {
    button.disabled = false;
  }
}

function shown(answer) {
  const text = answer.replace(/\n{3,}/g, "\n\n").trim();
  return text || "(an empty answer)";
}

// ---- deploy ---------------------------------------------------------------------------------------------------
let jobsTimer = null;

export async function showDeploy() {
  await fillRunSelect(document.getElementById("deploy-run"));
  let commands;
  try { ({commands} = await api("/api/deploy")); } catch (err) { banner(err.message); return; }
  const root = clear(document.getElementById("deploy-commands"));
  for (const [name, spec] of Object.entries(commands)) root.append(commandCard(name, spec));
  refreshJobs();
}

export function hideDeploy() {
  clearTimeout(jobsTimer);
}

function paramInput(param) {
  const data = {dataset: {param: param.name}};
  if (param.kind === "flag") return el("input", {type: "checkbox", ...data, checked: param.default === true});
  if (param.kind === "choice") {
    return el("select", data, param.required ? null : option("", "(default)"),
      param.choices.map((c) => option(c, c, c === param.default)));
  }
  const where = {output: "a path inside the runs folder", input: "an existing file, or a path in the runs folder"};
  const secret = /key|token|secret|password/i.test(param.name);
  return el("input", {type: secret ? "password" : "text", autocomplete: "off", ...data, placeholder: param.default !== null ? String(param.default) :
    (where[param.path] || (param.required ? "required" : ""))});
}

function paramsForm(params) {
  return el("div", {class: "params"}, params.map((p) => el("label", {class: p.kind === "flag" ? "flag" : "param"},
    p.kind === "flag" ? [paramInput(p), el("span", {class: "key", text: p.flag})] : [el("span", {class: "key", text: p.flag}), paramInput(p)],
    p.help ? el("span", {class: "help", text: p.help}) : null)));
}

function commandCard(name, spec) {
  const card = el("div", {class: "panel deploy-card", dataset: {command: name}},
    el("h3", {text: `tuneforge ${name}`}), el("p", {class: "muted small", text: spec.purpose}));
  if (!spec.available) {
    card.classList.add("unavailable");
    card.append(el("div", {class: "not-available", text: spec.message}));
    return card;
  }
  let body = el("div");
  let sub = null;
  if (spec.subcommands) {
    sub = el("select", {class: "subcommand"}, Object.keys(spec.subcommands).map((s) => option(s, s)));
    const draw = () => clear(body).append(paramsForm(spec.subcommands[sub.value].params || []));
    sub.addEventListener("change", draw);
    card.append(sub);
    draw();
  } else {
    body.append(paramsForm(spec.params));
  }
  card.append(body, el("button", {class: "primary", text: `Run ${name}`, onclick: () => runCommand(name, card, sub)}));
  return card;
}

async function runCommand(name, card, sub) {
  const run = document.getElementById("deploy-run").value;
  if (!run) { banner("choose a finished run first"); return; }
  const options = {};
  for (const input of card.querySelectorAll("[data-param]")) {
    const value = input.type === "checkbox" ? input.checked : input.value.trim();
    if (value !== "") options[input.dataset.param] = value;  // flags always: unticking a default-on flag counts
  }
  try {
    const result = await api(`/api/deploy/${name}`, {run, options, subcommand: sub ? sub.value : null});
    banner(`started: ${result.job.command}`, "info");
    refreshJobs();
  } catch (err) { banner(err.message); }
}

async function refreshJobs() {
  clearTimeout(jobsTimer);
  let jobs;
  try { ({jobs} = await api("/api/jobs")); } catch (err) { return; }
  const root = clear(document.getElementById("jobs"));
  if (!jobs.length) root.append(el("div", {class: "muted", text: "No jobs started from this board yet."}));
  for (const job of jobs) {
    const log = el("pre", {class: "mono log"});
    const box = el("details", {class: "job", dataset: {job: job.id},
      ontoggle: async () => { if (box.open) log.textContent = (await api(`/api/job?id=${job.id}`)).log; }},
    el("summary", {}, badge(job.state), " ", el("code", {text: job.command}),
      job.state === "running" ? el("button", {class: "small-button", text: "Stop", onclick: async (e) => {
        e.preventDefault();
        try { await api("/api/job/stop", {id: job.id}); refreshJobs(); } catch (err) { banner(err.message); }
      }}) : null), log);
    root.append(box);
  }
  if (jobs.some((j) => j.state === "running" || j.state === "stopping")) jobsTimer = setTimeout(refreshJobs, 2000);
}
