// Shared helpers: JSON requests to the board, building elements (text only: nothing the server sends is parsed
// as HTML), the error banner, number and time formats.

export async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw Object.assign(new Error("the board does not answer (is `tuneforge board` still running?)"), {status: 0});
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = {error: `HTTP ${response.status}`}; }
  if (!response.ok) {
    throw Object.assign(new Error(data.error || `HTTP ${response.status}`), {status: response.status, data});
  }
  return data;
}

// el("div", {class: "x", text: "hi", dataset: {key: "a"}, onclick: f}, child, "text", ...)
export function el(tag, attrs = {}, ...children) {
  const svg = ["svg", "g", "path", "line", "polyline", "circle", "text", "rect", "title"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.setAttribute("class", value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && !svg && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

export function banner(message, kind = "error") {
  const node = document.getElementById("banner");
  if (!message) { node.classList.add("hidden"); return; }
  clear(node).append(el("span", {text: message}), el("button", {class: "close", text: "×", title: "dismiss",
    onclick: () => node.classList.add("hidden")}));
  node.className = `banner ${kind}`;
}

export function badge(state) {
  const kind = {completed: "ok", finished: "ok", running: "info", starting: "info", stopping: "warn", interrupted: "warn",
    stopped: "warn", failed: "bad", killed: "bad"}[state] || "muted";
  return el("span", {class: `badge ${kind}`, text: state, dataset: {state}});
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function when(epoch) {
  if (!epoch) return "–";
  return new Date(epoch * 1000).toLocaleString([], {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"});
}

export function option(value, label, selected = false) {
  return el("option", {value, text: label ?? value, selected});
}

// Runs for a <select>: completed ones (chat, deploy); keeps the current choice when it is still there.
export async function fillRunSelect(select, filter = (run) => run.state === "completed") {
  const current = select.value || new URLSearchParams(location.hash.split("?")[1] || "").get("run");
  const {runs} = await api("/api/runs");
  const usable = runs.filter(filter);
  clear(select);
  if (!usable.length) select.append(option("", "no finished run yet"));
  for (const run of usable) select.append(option(run.id, `${run.id} (${run.method || "?"}, ${run.adapter || "?"})`, run.id === current));
  return usable;
}
