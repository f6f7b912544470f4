// The recommend questionnaire: the decision tree's questions (only those that apply to the answers so far, as the
// server's QUESTIONS say), then the recipe and the reason for each choice; "Use this recipe" fills the builder.

import {api, banner, clear, el, option} from "./api.js";
import {loadRecipe} from "./recipe.js";

const answers = {};

export async function showRecommend() {
  await renderQuestions();
}

async function renderQuestions(depth = 0) {
  document.getElementById("questions").dataset.state = "loading";
  let questions;
  try {
    ({questions} = await api("/api/recommend/questions", {answers}));
  } catch (err) { banner(err.message); return; }
  // a default answer can open further questions (goal task -> "tried prompting?"): ask again until nothing changes
  const fresh = questions.filter((q) => !(q.key in answers) && q.default !== null && q.default !== undefined);
  for (const q of fresh) answers[q.key] = String(q.default);
  if (fresh.length && depth < 5) return renderQuestions(depth + 1);
  const root = clear(document.getElementById("questions"));
  for (const q of questions) {
    const value = answers[q.key] ?? "";
    let input;
    if (q.kind === "choice" || q.kind === "bool") {
      const choices = q.kind === "bool" ? [{value: "yes", label: "yes"}, {value: "no", label: "no"}] : q.choices;
      input = el("select", {dataset: {key: q.key}}, choices.map((c) => option(c.value, c.label, c.value === value)));
      input.addEventListener("change", () => { answers[q.key] = input.value; renderQuestions(); });
    } else {
      input = el("input", {type: q.kind === "number" ? "number" : "text", value, dataset: {key: q.key}});
      input.addEventListener("change", () => { answers[q.key] = input.value; });
    }
    root.append(el("div", {class: "question"}, el("label", {text: q.text}), input,
      q.help && q.kind !== "choice" ? el("div", {class: "help", text: q.help}) : null));
  }
  for (const key of Object.keys(answers)) {
    if (!questions.some((q) => q.key === key)) delete answers[key];  // a question that no longer applies
  }
  root.dataset.state = "ready";
}

export async function recommendNow() {
  const out = clear(document.getElementById("recommendation"));
  for (const input of document.querySelectorAll("#questions [data-key]")) answers[input.dataset.key] = input.value;
  let result;
  try {
    result = await api("/api/recommend", {answers});
  } catch (err) { banner(err.message); return; }
  out.append(el("h2", {text: result.train ? "Recommendation" : "Recommendation: do not fine-tune (yet)"}));
  out.append(el("ul", {class: "reasons"}, result.reasons.map((r) => el("li", {text: r}))));
  if (!result.train) return;
  out.append(el("pre", {class: "mono yaml-out", text: result.yaml}));
  out.append(el("div", {class: "actions"}, el("button", {class: "primary", id: "use-recipe", text: "Use this recipe",
    onclick: () => { loadRecipe(result.values, result.extras); location.hash = "#recipe"; }})));
}
