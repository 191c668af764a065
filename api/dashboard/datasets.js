// Datasets: the list, and one dataset's validation report with thumbnails of the accepted images.

import { api, showImage } from "./api.js";
import { add, card, fmtTime, h, statusBadge } from "./dom.js";

const THUMB = 128;

export async function datasetsView(root, scope) {
  const page = await api("/v1/datasets", { params: { limit: 100 }, signal: scope.signal });
  root.append(
    h("div", { class: "view-head" }, h("h1", {}, "Datasets")),
    page.data.length
      ? h("table", { class: "table", id: "datasets-table" },
        h("thead", {}, h("tr", {}, ["Dataset", "Name", "Status", "Images", "Rejected", "Created"].map((t) => h("th", {}, t)))),
        h("tbody", {}, page.data.map((ds) => h("tr", {},
          h("td", {}, h("a", { href: `#/datasets/${ds.id}` }, ds.id)),
          h("td", {}, ds.name || "–"),
          h("td", {}, statusBadge(ds.status)),
          h("td", { class: "num" }, ds.image_count),
          h("td", { class: "num" }, ds.report?.counts?.rejected ?? (ds.report?.rejected || []).length),
          h("td", {}, fmtTime(ds.created_at))))))
      : h("p", { class: "muted" }, "No datasets yet: upload one with POST /v1/datasets or `atelier datasets upload`."),
  );
}

function size(s) {
  return s ? `${s.width}×${s.height}` : "–";
}

function countsCard(counts) {
  const tiles = [["accepted", counts.accepted], ["rejected", counts.rejected],
    ["captioned", counts.captioned], ["with conditioning", counts.conditioned]];
  return h("div", { class: "counts", id: "dataset-counts" }, tiles.map(([label, value]) =>
    h("div", { class: `count count-${label.split(" ")[0]}` }, h("strong", {}, value ?? 0), h("span", {}, label))));
}

function resolutionsCard(resolutions) {
  if (!resolutions) return null;
  return card("Resolutions",
    h("p", {}, `Smallest ${size(resolutions.smallest)} · largest ${size(resolutions.largest)}`),
    h("table", { class: "table compact", id: "resolutions" },
      h("thead", {}, h("tr", {}, h("th", {}, "Size"), h("th", {}, "Images"))),
      h("tbody", {}, (resolutions.most_common || []).map((r) =>
        h("tr", {}, h("td", {}, size(r)), h("td", { class: "num" }, r.count))))));
}

function rejectedCard(rejected) {
  if (!rejected.length) return card("Rejected files", h("p", { class: "muted" }, "None: every file was used."));
  return card(`Rejected files (${rejected.length})`,
    h("table", { class: "table", id: "rejected" },
      h("thead", {}, h("tr", {}, ["File", "Code", "Reason"].map((t) => h("th", {}, t)))),
      // Refused uploads list {file, code, reason}; stored reports {name, code, reason}.
      h("tbody", {}, rejected.map((r) => h("tr", {},
        h("td", {}, r.name ?? r.file), h("td", {}, h("code", {}, r.code)), h("td", {}, r.reason))))));
}

// Thumbnails load as they scroll into view: a dataset may hold thousands of images.
function thumbnails(scope, dataset, accepted) {
  const grid = h("div", { class: "thumbs", id: "thumbnails" });
  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      observer.unobserve(entry.target);
      const { index, conditioning } = entry.target.dataset;
      const params = new URLSearchParams({ size: THUMB, ...(conditioning ? { conditioning: "true" } : {}) });
      showImage(scope, entry.target, `/v1/datasets/${dataset.id}/images/${index}?${params}`);
    }
  }, { rootMargin: "200px" });
  scope.signal.addEventListener("abort", () => observer.disconnect());
  accepted.forEach((item, index) => {
    const images = [h("img", { class: "thumb", alt: item.name, width: THUMB, height: THUMB, dataset: { index } })];
    if (item.conditioning) {
      images.push(h("img", { class: "thumb conditioning", alt: `${item.name} (conditioning)`, width: THUMB, height: THUMB, dataset: { index, conditioning: "1" } }));
    }
    images.forEach((img) => observer.observe(img));
    grid.append(h("figure", { class: "thumb-card" }, h("div", { class: "thumb-images" }, images),
      h("figcaption", {}, h("strong", {}, item.name), h("span", { class: "muted" }, ` ${item.width}×${item.height}`),
        item.caption ? h("span", { class: "caption" }, item.caption) : h("span", { class: "muted caption" }, "no caption"))));
  });
  return grid;
}

export async function datasetView(root, scope, datasetId) {
  const ds = await api(`/v1/datasets/${datasetId}`, { signal: scope.signal });
  const report = ds.report || {};
  const accepted = report.accepted || [];
  add(root,
    h("div", { class: "view-head" }, h("h1", {}, `Dataset ${ds.name || ds.id}`), statusBadge(ds.status)),
    h("p", { class: "muted" }, `${ds.id} · created ${fmtTime(ds.created_at)}`),
    ds.error && h("p", { class: "error" }, `${ds.error.code}: ${ds.error.message || ""}`),
    card("Validation report", countsCard(report.counts || { accepted: ds.image_count, rejected: (report.rejected || []).length })),
    resolutionsCard(report.resolutions),
    rejectedCard(report.rejected || []),
    card(`Images (${accepted.length})`, ds.status === "ready" && accepted.length
      ? thumbnails(scope, ds, accepted)
      : h("p", { class: "muted" }, "No images to show.")),
  );
}
