// Runs: the list (status from status.json), one run watched live (progress, ETA, charts from metrics.jsonl, stop,
// resume, its log and its report.html), and the comparison of several runs.

import {api, badge, banner, clear, duration, el, when} from "./api.js";
import {lineChart} from "./chart.js";
import {loadRecipe} from "./recipe.js";

let poll = null;
let listed = "";  // the runs as last drawn: the table is redrawn only when they change (no lost clicks)
const LIVE = ["starting", "running", "stopping"];

export function stopPolling() {
  clearTimeout(poll);
  poll = null;
}

function every(ms, fn) {
  stopPolling();
  const tick = async () => {
    let again = true;
    try { again = await fn(); } catch (err) { banner(err.message); }
    if (again !== false) poll = setTimeout(tick, ms);
  };
  tick();
}

// ---- the list -------------------------------------------------------------------------------------------------
export function showRuns() {
  listed = "";
  every(3000, refreshList);
}

async function refreshList() {
  const {runs, runs_dir: dir} = await api("/api/runs");
  document.getElementById("runs-dir").textContent = dir;
  if (JSON.stringify(runs) === listed) return;
  listed = JSON.stringify(runs);
  const body = document.querySelector("#runs-table tbody");
  const checked = new Set([...body.querySelectorAll("input:checked")].map((c) => c.value));
  clear(body);
  for (const run of runs) {
    const box = el("input", {type: "checkbox", value: run.id, checked: checked.has(run.id), onchange: updateCompare});
    body.append(el("tr", {dataset: {run: run.id}},
      el("td", {}, box),
      el("td", {}, el("a", {href: `#run/${encodeURIComponent(run.id)}`, text: run.id})),
      el("td", {}, badge(run.state), run.error ? el("div", {class: "small bad-text", text: run.error.slice(0, 160)}) : null),
      el("td", {text: run.method || "–"}), el("td", {class: "small", text: run.model || "–"}),
      el("td", {text: run.adapter || "–"}), el("td", {class: "num", text: run.steps ?? "–"}),
      el("td", {class: "small", text: when(run.started)})));
  }
  document.getElementById("runs-empty").classList.toggle("hidden", runs.length > 0);
  updateCompare();
}

function updateCompare() {
  const chosen = [...document.querySelectorAll("#runs-table tbody input:checked")].map((c) => c.value);
  const button = document.getElementById("compare-go");
  button.disabled = chosen.length < 2;
  button.onclick = () => { location.hash = `#compare/${chosen.map(encodeURIComponent).join(",")}`; };
}

// ---- one run --------------------------------------------------------------------------------------------------
export function showRun(runId) {
  const page = clear(document.getElementById("run-page"));
  page.append(el("div", {class: "toolbar"}, el("h1", {text: runId}), el("span", {id: "run-state"}),
    el("span", {class: "grow"}),
    el("button", {id: "run-stop", text: "Stop (Ctrl-C)", class: "danger", onclick: () => act("stop", runId)}),
    el("button", {id: "run-resume", text: "Resume", onclick: () => act("resume", runId)}),
    el("button", {id: "run-edit", text: "Edit as new recipe", onclick: () => editRecipe(runId)}),
    el("a", {class: "button", href: `#chat?run=${encodeURIComponent(runId)}`, text: "Chat"}),
    el("a", {class: "button", href: `#deploy?run=${encodeURIComponent(runId)}`, text: "Deploy"})),
  el("div", {id: "run-error", class: "error-box hidden"}),
  el("div", {class: "progress-row"}, el("div", {class: "progress"}, el("div", {class: "bar", id: "run-bar"})),
    el("span", {id: "run-progress", class: "small"})),
  el("div", {class: "charts", id: "run-charts"}),
  el("details", {id: "run-log-box"}, el("summary", {text: "log of the board's process for this run"}),
    el("pre", {id: "run-log", class: "mono log"})),
  el("div", {id: "run-report"}));
  let reportShown = false;
  every(1000, async () => {
    const run = await api(`/api/run?run=${encodeURIComponent(runId)}`);
    renderRun(run);
    if (run.has_report && !reportShown && !LIVE.includes(run.state) && !run.live) { reportShown = true; showReport(runId); }
    if (!run.has_report && !LIVE.includes(run.state) && !run.live && run.exists) showReportButton(runId);
    return LIVE.includes(run.state) || run.live || (run.job && run.job.state === "running");
  });
}

function renderRun(run) {
  clear(document.getElementById("run-state")).append(badge(run.state));
  const stoppable = run.state === "starting" || (run.live && run.state === "running");
  document.getElementById("run-stop").disabled = !stoppable || (run.job && run.job.state === "stopping");
  document.getElementById("run-resume").disabled = !run.resumable;
  const error = document.getElementById("run-error");
  const message = run.error || (run.job && run.job.state === "failed" && !run.exists ? lastLines(run.job.log) : "");
  error.textContent = message ? `error: ${message}` : "";
  error.classList.toggle("hidden", !message);
  if (run.job) document.getElementById("run-log").textContent = run.job.log || "";
  document.getElementById("run-log-box").classList.toggle("hidden", !run.job);
  if (!run.exists) {
    document.getElementById("run-progress").textContent = run.state === "starting"
      ? "starting: checking the recipe, loading the model and the data…" : "the run did not start (see the error)";
    return;
  }
  const p = run.progress;
  const share = p.total ? Math.min(1, p.step / p.total) : 0;
  document.getElementById("run-bar").style.width = `${(share * 100).toFixed(1)}%`;
  document.getElementById("run-progress").textContent = `step ${p.step}${p.total ? ` of ${p.exact ? "" : "~"}${p.total}` : ""}` +
    ` · ${duration(p.elapsed)} elapsed` + (p.eta !== null && p.eta !== undefined ? ` · ETA ${duration(p.eta)}` : "");
  const s = run.series;
  const evalSeries = Object.entries(s.eval).filter(([k]) => k === "eval_loss").map(([k, v]) => ({name: k, points: v}));
  const charts = [
    lineChart([{name: "loss", points: s.loss}], {title: "training loss"}),
    lineChart([{name: "learning_rate", points: s.learning_rate}], {title: "learning rate"}),
    lineChart([{name: "tokens_per_s", points: s.tokens_per_s}], {title: "throughput (tokens/s)"}),
    lineChart(evalSeries, {title: "held-out loss (eval)", legend: true, empty: "no evaluation yet (train.eval_every)"}),
  ];
  if (s.reward && s.reward.length) charts.push(lineChart([{name: "reward", points: s.reward}], {title: "reward"}));
  clear(document.getElementById("run-charts")).append(...charts.map((c) => el("div", {class: "chart-box"}, c)));
}

function lastLines(text) {
  const lines = (text || "").split("\n").filter((l) => l.trim());
  const start = lines.findIndex((l) => l.startsWith("error:"));
  return (start >= 0 ? lines.slice(start) : lines.slice(-6)).join("\n");
}

async function act(what, runId) {
  try {
    const result = await api(`/api/run/${what}`, {run: runId});
    banner(what === "stop" ? `stop sent (SIGINT to process ${result.pid}): the run saves a checkpoint and stops`
      : `resuming from ${result.checkpoint}: ${result.job.command}`, "info");
    showRun(runId);
  } catch (err) { banner(err.message); }
}

async function editRecipe(runId) {
  try {
    const recipe = await api(`/api/run/recipe?run=${encodeURIComponent(runId)}`);
    loadRecipe(recipe.values, recipe.extras);
    location.hash = "#recipe";
  } catch (err) { banner(err.message); }
}

function showReport(runId) {
  clear(document.getElementById("run-report")).append(el("h2", {text: "Report"}),
    el("iframe", {id: "report-frame", class: "report", sandbox: "", title: "report.html",
      src: `/api/run/report?run=${encodeURIComponent(runId)}&t=${Date.now()}`}));
}

function showReportButton(runId) {
  const box = document.getElementById("run-report");
  if (box.querySelector("button")) return;
  clear(box).append(el("button", {text: "Write report.html", onclick: async () => {
    try { await api("/api/run/report", {run: runId}); showReport(runId); } catch (err) { banner(err.message); }
  }}));
}

// ---- comparison -----------------------------------------------------------------------------------------------
export async function showCompare(ids) {
  stopPolling();
  const page = clear(document.getElementById("compare-page"));
  page.append(el("div", {class: "toolbar"}, el("h1", {text: `Comparing ${ids.length} runs`}),
    el("span", {class: "muted", text: "loading…", id: "compare-note"})));
  let result;
  try {
    result = await api("/api/compare", {runs: ids});
  } catch (err) { banner(err.message); document.getElementById("compare-note").textContent = ""; return; }
  document.getElementById("compare-note").textContent = ids.join(" · ");
  const table = el("table", {class: "compare", id: "compare-table"},
    el("thead", {}, el("tr", {}, el("th"), result.labels.map((l) => el("th", {class: "num", text: l})))),
    el("tbody", {}, result.rows.map((row) => el("tr", {}, el("td", {text: row.label}),
      row.cells.map((c) => el("td", {class: "num", text: c}))))));
  const curves = (key) => Object.entries(result.curves[key]).map(([name, points]) => ({name, points}));
  page.append(table, el("div", {class: "charts"},
    el("div", {class: "chart-box"}, lineChart(curves("loss"), {title: "training loss", legend: true})),
    el("div", {class: "chart-box"}, lineChart(curves("eval_loss"), {title: "held-out loss", legend: true}))),
  el("details", {}, el("summary", {text: "the comparison page (tuneforge report)"}),
    el("iframe", {class: "report", sandbox: "", title: "comparison",
      src: `/api/compare/page?name=${encodeURIComponent(result.page)}`})));
}
