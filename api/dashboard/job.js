// One job: summary and progress, a live loss curve, samples per checkpoint, events, downloads.
//
// Live updates come from the job's server-sent events (every event, plus `progress` snapshots);
// each snapshot adds a (step, loss) point. Once the job has an artifact, its manifest's
// loss_history (a point about every 1% of the steps) replaces the live points it covers.

import { ApiError, api, download, events, showImage } from "./api.js";
import { lossChart } from "./chart.js";
import {
  TERMINAL, add, card, errorBox, fmtBytes, fmtDuration, fmtLoss, fmtTime, h, progressBar, replace, statusBadge,
} from "./dom.js";

const REFRESHING_EVENTS = new Set(["started", "checkpoint", "resumed", "requeued", "cancel_requested"]);

class JobPage {
  constructor(root, scope, jobId) {
    this.root = root;
    this.scope = scope;
    this.id = jobId;
    this.job = null;
    this.points = new Map();
    this.lastEventId = 0;
    this.artifactShown = null;
    this.summary = h("div", { class: "summary" });
    this.chart = h("div", { class: "chart", id: "loss-chart" });
    this.samples = h("div", { class: "samples", id: "samples" });
    this.artifact = h("div", { id: "artifact" }, h("p", { class: "muted" }, "The artifact appears when the job succeeds."));
    this.eventRows = h("tbody", {});
  }

  async start() {
    await this.refreshJob();
    add(this.root,
      this.summary,
      card("Loss", this.chart),
      card("Samples", this.samples),
      card("Artifact", this.artifact),
      card("Events", h("table", { class: "table events", id: "events" },
        h("thead", {}, h("tr", {}, ["#", "Type", "Attempt", "Time", "Details"].map((t) => h("th", {}, t)))),
        this.eventRows)),
    );
    this.drawChart();
    await Promise.all([this.loadSamples(), this.loadArtifact()]);
    this.follow();
  }

  async refreshJob() {
    this.job = await api(`/v1/jobs/${this.id}`, { signal: this.scope.signal });
    this.renderSummary();
  }

  renderSummary() {
    const job = this.job;
    const p = job.progress;
    const cancel = !TERMINAL.has(job.status) && !job.cancel_requested &&
      h("button", { type: "button", class: "danger", onclick: () => this.cancel() }, "Cancel");
    const fields = [
      ["Method", job.method], ["Base model", job.base_model],
      ["Dataset", h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id)],
      ["Attempt", `${job.attempt} of ${job.max_attempts}`],
      ["Phase", p.phase ? p.phase.replaceAll("_", " ") : "–"],
      ["Loss", fmtLoss(p.loss)], ["Speed", p.it_per_s ? `${p.it_per_s.toFixed(2)} it/s` : "–"],
      ["ETA", fmtDuration(p.eta_s)], ["Checkpoint", job.checkpoint_step ?? "–"],
      ["Created", fmtTime(job.created_at)], ["Started", fmtTime(job.started_at)],
      ["Finished", fmtTime(job.finished_at)],
    ];
    replace(this.summary,
      h("div", { class: "view-head" },
        h("h1", {}, `Job ${job.id}`), h("span", { id: "job-status" }, statusBadge(job.status)), cancel),
      progressBar(p, job.status),
      job.error && errorBox(`${job.error.code}: ${job.error.message || ""}`),
      h("dl", { class: "fields" }, fields.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    );
  }

  async cancel() {
    try {
      this.job = await api(`/v1/jobs/${this.id}/cancel`, { method: "POST" });
      this.renderSummary();
    } catch (error) {
      this.summary.append(errorBox(error.message));
    }
  }

  drawChart() {
    const points = [...this.points.entries()].sort((a, b) => a[0] - b[0]);
    this.chart.replaceChildren(lossChart(points, this.job.progress.total));
  }

  // The event stream ends when the job is terminal; a dropped connection resumes after the last id.
  async follow() {
    while (this.scope.alive) {
      try {
        for await (const message of events(`/v1/jobs/${this.id}/events`, { after: this.lastEventId }, this.scope.signal)) {
          if (message.event === "progress") this.onProgress(JSON.parse(message.data));
          else this.onEvent(JSON.parse(message.data));
        }
        await this.refreshJob();
        if (TERMINAL.has(this.job.status)) return;
      } catch (error) {
        if (!this.scope.alive) return;
        if (error instanceof ApiError && error.status < 500) {
          this.summary.append(errorBox(`live updates stopped: ${error.message}`));
          return;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  onProgress(progress) {
    this.job.progress = progress;
    this.renderSummary();
    // After a success the row's step jumps to the total while its loss is the last heartbeat's:
    // only a running job's snapshots are curve points (the manifest has the final ones).
    if (this.job.status === "running" && progress.step > 0 && progress.loss !== null) {
      this.points.set(progress.step, progress.loss);
      this.drawChart();
    }
  }

  onEvent(event) {
    this.lastEventId = Math.max(this.lastEventId, event.id);
    this.eventRows.append(eventRow(event));
    if (event.type === "sample") this.soon("samples", () => this.loadSamples());
    if (REFRESHING_EVENTS.has(event.type) || TERMINAL.has(event.type)) {
      if (TERMINAL.has(event.type)) this.job.status = event.type;
      this.soon("job", () => this.refreshJob().then(() => this.loadArtifact()));
    }
  }

  // Opening a finished job replays all its events at once: one reload per burst, not per event.
  soon(name, fn) {
    this.pending ??= new Set();
    if (this.pending.has(name)) return;
    this.pending.add(name);
    setTimeout(() => {
      this.pending.delete(name);
      if (this.scope.alive) fn().catch(() => {});
    }, 250);
  }

  async loadSamples() {
    const list = await api(`/v1/jobs/${this.id}/samples`, { signal: this.scope.signal });
    if (!list.data.length) {
      this.samples.replaceChildren(h("p", { class: "muted" },
        this.job.training.sample_prompts?.length ? "No samples yet." : "This job makes no samples (training.sample_prompts)."));
      return;
    }
    const groups = new Map();
    for (const sample of list.data) {
      const key = `${sample.attempt}:${sample.step}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(sample);
    }
    this.samples.replaceChildren(...[...groups.values()].map((group) => this.sampleGroup(group)));
  }

  sampleGroup(group) {
    const { step, attempt } = group[0];
    const last = step === this.job.progress.total ? " (final)" : "";
    return h("div", { class: "sample-group", dataset: { step } },
      h("h3", {}, `Step ${step}${last}`, this.job.attempt > 1 ? ` · attempt ${attempt}` : ""),
      h("div", { class: "sample-row" }, group.map((sample) => {
        const img = h("img", { class: "sample", alt: sample.prompt, width: 160, height: 160 });
        showImage(this.scope, img, sample.url);
        return h("figure", {}, img, h("figcaption", {}, sample.prompt));
      })));
  }

  async loadArtifact() {
    if (!this.job.artifact_id || this.artifactShown === this.job.artifact_id) return;
    this.artifactShown = this.job.artifact_id;
    const artifact = await api(`/v1/artifacts/${this.job.artifact_id}`, { signal: this.scope.signal });
    const history = artifact.manifest.metrics?.loss_history || [];
    if (history.length) {
      const first = history[0][0];
      for (const step of this.points.keys()) if (step >= first) this.points.delete(step);
      for (const [step, loss] of history) this.points.set(step, loss);
      this.drawChart();
    }
    this.artifact.replaceChildren(artifactView(artifact));
  }
}

// One line a person can read; the full data stays in the row's title.
function describe(event) {
  const data = event.data || {};
  switch (event.type) {
    case "checkpoint":
      return `step ${data.step}`;
    case "sample":
      return `step ${data.step} · ${(data.images || []).length} image(s)`;
    case "started":
      return data.worker ? `worker ${data.worker}` : "";
    case "resumed":
      return `from step ${data.from_step}`;
    case "succeeded":
      return data.artifact_id ? `artifact ${data.artifact_id}` : "";
    default:
      if (data.error) return `${data.error.code}: ${data.error.message || ""}`;
      return Object.keys(data).length ? JSON.stringify(data) : "";
  }
}

function eventRow(event) {
  const full = Object.keys(event.data || {}).length ? JSON.stringify(event.data) : null;
  return h("tr", { dataset: { type: event.type } },
    h("td", { class: "num" }, event.id),
    h("td", {}, h("span", { class: `badge event-${event.type}` }, event.type)),
    h("td", { class: "num" }, event.attempt),
    h("td", { class: "nowrap" }, fmtTime(event.created_at)),
    h("td", { class: "details", title: full }, describe(event)));
}

/** Each format the manifest lists, with its files: the primary (diffusers) files, then each export. */
function artifactView(artifact) {
  const manifest = artifact.manifest;
  const sizes = new Map((manifest.files || []).map((f) => [f.name, f.bytes]));
  const exported = new Set(Object.values(manifest.exports || {}).flat());
  const formats = [["diffusers", [...(manifest.files || []).map((f) => f.name).filter((n) => !exported.has(n)), "manifest.json"]]];
  formats.push(...Object.entries(manifest.exports || {}));
  const status = h("p", { class: "download-status muted" });
  const rows = formats.map(([format, names]) => h("tr", { dataset: { format } },
    h("th", {}, format),
    h("td", {}, h("ul", { class: "files" }, names.map((name) => h("li", {},
      h("button", {
        type: "button",
        class: "link download",
        dataset: { format, file: name },
        onclick: () => fetchFile(artifact.id, format, name, status),
      }, name),
      sizes.has(name) ? h("span", { class: "muted" }, ` ${fmtBytes(sizes.get(name))}`) : null))))));
  for (const [format, reason] of Object.entries(manifest.export_errors || {})) {
    rows.push(h("tr", { dataset: { format } }, h("th", {}, format), h("td", { class: "muted" }, `not available: ${reason}`)));
  }
  const metrics = manifest.metrics || {};
  return h("div", {},
    h("p", {}, "Artifact ", h("code", {}, artifact.id), ` · ${artifact.method} on ${artifact.base_model}`,
      metrics.final_loss !== undefined ? ` · final loss ${fmtLoss(metrics.final_loss)}` : "",
      metrics.images_per_s ? ` · ${metrics.images_per_s.toFixed(2)} images/s` : ""),
    h("table", { class: "table formats", id: "artifact-formats" }, h("tbody", {}, rows)),
    status);
}

async function fetchFile(artifactId, format, name, status) {
  status.textContent = `downloading ${name}…`;
  try {
    await download(`/v1/artifacts/${artifactId}/download`, { format, file: name }, name.split("/").pop());
    status.textContent = `${name}: download started`;
  } catch (error) {
    // A TypeError is the browser refusing a cross-origin redirect (storage without CORS).
    status.textContent = error instanceof TypeError
      ? `${name}: the storage refused the browser (CORS); use \`atelier artifacts download\``
      : `${name}: ${error.message}`;
  }
}

export async function jobView(root, scope, jobId) {
  await new JobPage(root, scope, jobId).start();
}
