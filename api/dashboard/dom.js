// Small DOM helpers. Everything from the API (file names, captions, prompts, error messages) goes in
// as text nodes or attribute values, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "style") {
      // Through the CSSOM: the page's CSP forbids inline style attributes.
      Object.assign(el.style, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("a", {href: "#/jobs"}, "Jobs") */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** Appends children as h() does: skipping null/false, so `cond && node` can be passed. */
export function add(el, ...children) {
  return build(el, null, children);
}

export function replace(el, ...children) {
  el.replaceChildren();
  return build(el, null, children);
}

export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const sec = total % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit && value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function fmtLoss(loss) {
  return loss === null || loss === undefined ? "–" : Number(loss).toPrecision(4);
}

export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

// The phase of a running job other than training ("caching latents 12/40"), or null: then the
// steps tell more (training, queued, finished, or a server that reports no phases).
function phaseOf(progress, status) {
  if (status !== "running" || !progress.phase || progress.phase === "training") return null;
  const name = progress.phase.replaceAll("_", " ");
  return { name, done: progress.phase_done ?? 0, total: progress.phase_total ?? 0 };
}

// Training steps; given the job's status, the bar follows a running job's phase before and after.
export function progressBar(progress, status = null) {
  const phase = phaseOf(progress, status);
  const [done, total] = phase ? [phase.done, phase.total] : [progress.step, progress.total || 0];
  const fraction = total ? Math.min(1, done / total) : 0;
  const label = phase ? `${phase.name} ${done}/${total}` : `${done}/${total}`;
  return h(
    "div",
    { class: "progress", title: phase ? label : `${done} of ${total} steps` },
    h("div", { class: "progress-track" },
      h("div", { class: "progress-fill", style: { width: `${(fraction * 100).toFixed(1)}%` } })),
    h("span", { class: "progress-label" }, label),
  );
}

export function card(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

export function errorBox(message) {
  return h("p", { class: "error", role: "alert" }, message);
}
