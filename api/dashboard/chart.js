// The loss curve as inline SVG: the raw reported losses, and an exponential moving average once
// there are enough points for smoothing to help read a noisy curve.

import { fmtLoss, s } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 260;
const PAD = { left: 56, right: 16, top: 14, bottom: 34 };
const SMOOTH_FROM = 12;

function ticks(lo, hi, count) {
  if (hi === lo) return [lo];
  return Array.from({ length: count }, (_, i) => lo + ((hi - lo) * i) / (count - 1));
}

// Whole steps at 1, 2 or 5 times a power of ten: labels sit on the steps they name.
function stepTicks(max) {
  const raw = Math.max(1, max / 5);
  const power = 10 ** Math.floor(Math.log10(raw));
  const every = [1, 2, 5, 10].map((m) => m * power).find((v) => v >= raw);
  return Array.from({ length: Math.floor(max / every) + 1 }, (_, i) => i * every);
}

function smoothed(points) {
  const out = [];
  let ema = points[0][1];
  for (const [step, loss] of points) {
    ema = 0.8 * ema + 0.2 * loss;
    out.push([step, ema]);
  }
  return out;
}

/**
 * points: [[step, loss], ...] sorted by step; total: the job's max_steps (the x axis spans it, so a
 * live curve grows to the right). data-steps lists the plotted steps (the browser test reads it).
 */
export function lossChart(points, total) {
  const svg = s("svg", {
    class: "loss-chart",
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `loss curve, ${points.length} points`,
    "data-points": points.length,
    "data-steps": points.map(([step]) => step).join(","),
  });
  if (!points.length) {
    svg.append(s("text", { x: WIDTH / 2, y: HEIGHT / 2, class: "chart-empty" }, "waiting for the first loss report…"));
    return svg;
  }
  const losses = points.map(([, loss]) => loss);
  let lo = Math.min(...losses);
  let hi = Math.max(...losses);
  const margin = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
  lo -= margin;
  hi += margin;
  const xMax = Math.max(total || 0, points[points.length - 1][0], 1);
  const x = (step) => PAD.left + (step / xMax) * (WIDTH - PAD.left - PAD.right);
  const y = (loss) => PAD.top + (1 - (loss - lo) / (hi - lo)) * (HEIGHT - PAD.top - PAD.bottom);
  const line = (pts) => pts.map(([step, loss]) => `${x(step).toFixed(1)},${y(loss).toFixed(1)}`).join(" ");

  for (const value of ticks(lo, hi, 5)) {
    svg.append(
      s("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value) }),
      s("text", { class: "tick tick-y", x: PAD.left - 6, y: y(value) + 4 }, fmtLoss(value)),
    );
  }
  for (const value of stepTicks(xMax)) {
    svg.append(s("text", { class: "tick tick-x", x: x(value), y: HEIGHT - PAD.bottom + 16 }, value));
  }
  svg.append(
    s("line", { class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: HEIGHT - PAD.bottom }),
    s("line", { class: "axis", x1: PAD.left, x2: WIDTH - PAD.right, y1: HEIGHT - PAD.bottom, y2: HEIGHT - PAD.bottom }),
    s("text", { class: "axis-label", x: WIDTH - PAD.right, y: HEIGHT - 4 }, "step"),
    s("polyline", { class: "loss-raw", points: line(points) }),
  );
  if (points.length >= SMOOTH_FROM) {
    svg.append(s("polyline", { class: "loss-smooth", points: line(smoothed(points)) }));
  }
  if (points.length <= 60) {
    for (const [step, loss] of points) {
      svg.append(s("circle", { class: "loss-point", cx: x(step), cy: y(loss), r: 3 },
        s("title", {}, `step ${step}: loss ${fmtLoss(loss)}`)));
    }
  }
  return svg;
}
