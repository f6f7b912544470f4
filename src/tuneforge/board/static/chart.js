// A small SVG line chart (no library): series of [x, y] points, nice axis ticks, a legend, a tooltip per point.

import {el, fmt} from "./api.js";

const COLORS = ["#2f6fdf", "#e0672b", "#1e8e3e", "#9b59b6", "#c0392b", "#16a2b8", "#b7791f", "#555f6d"];

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = [1, 2, 2.5, 5, 10].find((m) => m * power >= raw) || 10;
  return unit * power;
}

function ticks(lo, hi, count) {
  if (lo === hi) { const pad = Math.abs(lo) * 0.05 || 1; lo -= pad; hi += pad; }
  const step = niceStep(hi - lo, count);
  const start = Math.floor(lo / step) * step;
  const end = Math.ceil(hi / step) * step;
  const out = [];
  for (let v = start; v <= end + step / 2; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

// series: [{name, points: [[x, y], ...]}]; options: {title, width, height, xLabel}
export function lineChart(series, options = {}) {
  const width = options.width || 440, height = options.height || 230;
  const pad = {left: 58, right: 14, top: 28, bottom: 36};
  const drawn = series.filter((s) => s.points && s.points.length);
  const svg = el("svg", {class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": options.title || "chart", "data-title": options.title || "",
    "data-points": String(drawn.reduce((n, s) => n + s.points.length, 0))});
  svg.append(el("text", {x: pad.left, y: 18, class: "chart-title", text: options.title || ""}));
  if (!drawn.length) {
    svg.append(el("text", {x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle",
      text: options.empty || "no data yet"}));
    return svg;
  }
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
  const xt = ticks(Math.min(...xs), Math.max(...xs), 5);
  const yt = ticks(Math.min(...ys), Math.max(...ys), 4);
  const [x0, x1, y0, y1] = [xt[0], xt[xt.length - 1], yt[0], yt[yt.length - 1]];
  const sx = (x) => pad.left + (x - x0) / (x1 - x0 || 1) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - (y - y0) / (y1 - y0 || 1) * (height - pad.top - pad.bottom);
  const axes = el("g", {class: "axes"});
  for (const y of yt) {
    axes.append(el("line", {x1: pad.left, x2: width - pad.right, y1: sy(y), y2: sy(y), class: "grid"}));
    axes.append(el("text", {x: pad.left - 6, y: sy(y) + 4, "text-anchor": "end", text: fmt(y, 3)}));
  }
  for (const x of xt) {
    axes.append(el("text", {x: sx(x), y: height - pad.bottom + 16, "text-anchor": "middle", text: fmt(x, 4)}));
  }
  axes.append(el("line", {x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom, class: "axis"}));
  axes.append(el("text", {x: width - pad.right, y: height - 4, "text-anchor": "end", class: "axis-label",
    text: options.xLabel || "step"}));
  svg.append(axes);
  drawn.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const group = el("g", {class: "series", "data-series": s.name, "data-count": String(s.points.length)});
    group.append(el("polyline", {fill: "none", stroke: color, "stroke-width": 2,
      points: s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")}));
    if (s.points.length <= 60) {
      for (const [x, y] of s.points) {
        group.append(el("circle", {cx: sx(x), cy: sy(y), r: 2.6, fill: color},
          el("title", {text: `${s.name}: ${fmt(y, 5)} at ${options.xLabel || "step"} ${fmt(x, 6)}`})));
      }
    }
    svg.append(group);
  });
  if (drawn.length > 1 || options.legend) {
    let x = width - pad.right;
    [...drawn].reverse().forEach((s, j) => {
      const i = drawn.length - 1 - j;
      const label = el("text", {x: x, y: 18, "text-anchor": "end", class: "legend", text: s.name});
      svg.append(label);
      x -= s.name.length * 6.2 + 8;
      svg.append(el("rect", {x: x, y: 10, width: 10, height: 10, fill: COLORS[i % COLORS.length]}));
      x -= 8;
    });
  }
  return svg;
}
