// The page's views, one per address: #recipe, #recommend, #runs, #run/<id>, #compare/<a>,<b>, #chat, #deploy.

import {banner} from "./api.js";
import {initRecipe} from "./recipe.js";
import {recommendNow, showRecommend} from "./recommend.js";
import {showCompare, showRun, showRuns, stopPolling} from "./runs.js";
import {hideDeploy, sendChat, showChat, showDeploy} from "./tools.js";

function route() {
  const [path] = location.hash.replace(/^#/, "").split("?");
  const [view, arg] = [path.split("/")[0] || "recipe", path.split("/").slice(1).join("/")];
  stopPolling();
  hideDeploy();
  for (const section of document.querySelectorAll(".view")) section.classList.toggle("active", section.id === `view-${view}`);
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === view || (view === "run" || view === "compare") && link.dataset.view === "runs");
  }
  const shown = {
    recipe: () => null,
    recommend: showRecommend,
    runs: showRuns,
    run: () => showRun(decodeURIComponent(arg)),
    compare: () => showCompare(arg.split(",").map(decodeURIComponent)),
    chat: showChat,
    deploy: showDeploy,
  }[view];
  if (!shown) { location.hash = "#recipe"; return; }
  Promise.resolve(shown()).catch((err) => banner(err.message));
}

async function start() {
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname + location.hash);  // the cookie keeps it; the address bar need not
  }
  document.getElementById("recommend-go").addEventListener("click", recommendNow);
  document.getElementById("chat-send").addEventListener("click", sendChat);
  window.addEventListener("hashchange", route);
  try {
    await initRecipe();
  } catch (err) {
    banner(err.message);
  }
  route();
  document.body.dataset.ready = "1";
}

start();
