// Entry point: asks for the API key once (kept in localStorage), then routes on the URL fragment.

import { ApiError, Scope, api, auth } from "./api.js";
import { datasetView, datasetsView } from "./datasets.js";
import { errorBox, h } from "./dom.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";

const main = document.getElementById("main");
const keyStatus = document.getElementById("key-status");

const ROUTES = [
  [/^#\/jobs\/([\w-]+)$/, jobView, "jobs"],
  [/^#\/datasets\/([\w-]+)$/, datasetView, "datasets"],
  [/^#\/datasets\/?$/, datasetsView, "datasets"],
  [/^(#\/?(jobs\/?)?)?$/, jobsView, "jobs"],
];

let scope = new Scope();

function keyView(message) {
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    autocomplete: "off",
    placeholder: "atl_…",
    required: true,
  });
  const form = h(
    "form",
    { class: "card key-form", id: "key-form" },
    h("h2", {}, "API key"),
    h("p", {}, "The dashboard calls the Atelier API with your key. It is kept in this browser only ",
      "(localStorage); create one with ", h("code", {}, "atelier keys create"), "."),
    message && errorBox(message),
    h("div", { class: "row" }, input, h("button", { type: "submit" }, "Use this key")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    auth.set(input.value);
    try {
      await api("/v1/jobs", { params: { limit: 1 } });
      render();
    } catch (error) {
      auth.clear();
      keyView(error instanceof ApiError && error.status === 401 ? "That key was not accepted." : error.message);
    }
  });
  main.replaceChildren(form);
  showKeyStatus();
  input.focus();
}

function showKeyStatus() {
  const key = auth.get();
  if (!key) {
    keyStatus.replaceChildren();
    return;
  }
  const forget = h("button", { class: "link", type: "button" }, "forget key");
  forget.addEventListener("click", () => {
    auth.clear();
    render();
  });
  keyStatus.replaceChildren(h("span", { class: "muted" }, `key …${key.slice(-4)}`), " ", forget);
}

async function render() {
  scope.dispose();
  scope = new Scope();
  if (!auth.get()) {
    keyView();
    return;
  }
  showKeyStatus();
  const hash = location.hash;
  const [pattern, view, section] = ROUTES.find(([re]) => re.test(hash)) || ROUTES[ROUTES.length - 1];
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === section);
  }
  const root = h("div", { class: "view" });
  main.replaceChildren(root);
  const current = scope;
  try {
    await view(root, current, ...(hash.match(pattern) || []).slice(1));
  } catch (error) {
    if (!current.alive) return;
    if (error instanceof ApiError && error.status === 401) {
      auth.clear();
      keyView("The API no longer accepts the stored key; enter another.");
      return;
    }
    root.append(errorBox(error.message));
  }
}

window.addEventListener("hashchange", render);
render();
