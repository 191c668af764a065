// The jobs table: newest first, refreshed while it is open, older pages on demand.

import { api } from "./api.js";
import { TERMINAL, fmtLoss, fmtTime, h, progressBar, statusBadge } from "./dom.js";

const PAGE = 25;
const STATUSES = ["", "queued", "running", "succeeded", "failed", "canceled"];

function jobRow(job) {
  return h(
    "tr",
    { class: "job-row", dataset: { jobId: job.id, status: job.status } },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, job.method),
    h("td", {}, job.base_model),
    h("td", {}, progressBar(job.progress)),
    h("td", { class: "num" }, fmtLoss(job.progress.loss)),
    h("td", {}, fmtTime(job.created_at)),
  );
}

export async function jobsView(root, scope) {
  const filter = h("select", { "aria-label": "status" },
    STATUSES.map((status) => h("option", { value: status }, status || "all statuses")));
  const body = h("tbody", {});
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Older jobs");
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet: create one with POST /v1/jobs or `atelier jobs create`.");
  root.append(
    h("div", { class: "view-head" }, h("h1", {}, "Jobs"), filter),
    h("table", { class: "table", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Base", "Progress", "Loss", "Created"].map((t) => h("th", {}, t)))),
      body),
    empty,
    more,
  );

  let shown = PAGE;
  let cursor = null;
  const load = async () => {
    const page = await api("/v1/jobs", {
      params: { limit: Math.min(shown, 100), status: filter.value },
      signal: scope.signal,
    });
    body.replaceChildren(...page.data.map(jobRow));
    cursor = page.data.length ? page.data[page.data.length - 1].id : null;
    more.hidden = !page.has_more;
    empty.hidden = page.data.length > 0;
    return page.data;
  };
  more.addEventListener("click", async () => {
    const page = await api("/v1/jobs", { params: { limit: PAGE, after: cursor, status: filter.value } });
    body.append(...page.data.map(jobRow));
    shown += page.data.length;
    cursor = page.data.length ? page.data[page.data.length - 1].id : cursor;
    more.hidden = !page.has_more;
  });
  filter.addEventListener("change", () => {
    shown = PAGE;
    load();
  });
  let jobs = await load();
  // Poll quickly while something is moving, slowly otherwise (new jobs still appear).
  let idleTicks = 0;
  scope.every(2000, async () => {
    const active = jobs.some((job) => !TERMINAL.has(job.status));
    idleTicks = active ? 0 : idleTicks + 1;
    if (active || idleTicks % 5 === 0) jobs = await load().catch(() => jobs);
  });
}
