// Small line charts of the daemon's own samples, drawn as inline SVG (no library, no inline
// style: the strokes are classes of style.css).

import { h, svg } from "./dom.js";
import { rate } from "./format.js";

const WIDTH = 300;
const HEIGHT = 72;

function points(values, top, span) {
  const step = values.length > 1 ? WIDTH / (span - 1) : 0;
  const offset = WIDTH - step * (values.length - 1);
  return values
    .map((value, index) => {
      const x = offset + index * step;
      const y = HEIGHT - (Math.max(0, value) / top) * (HEIGHT - 4) - 2;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
}

/**
 * A chart of one or more series over the kept samples: `series` is [{label, cls, values}];
 * `limit`, when given, is drawn as a dashed line and counted in the scale.
 */
export function lineChart({ title, series, limit, span, minutes, unit = "/s" }) {
  const all = series.flatMap((s) => s.values);
  const top = Math.max(1, limit || 0, ...all) * 1.1;
  const drawing = svg(
    "svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      preserveAspectRatio: "none",
      class: "chart-svg",
      role: "img",
      "aria-label": `${title}, the last ${minutes} minutes`,
    },
    svg("line", { x1: 0, y1: HEIGHT - 1, x2: WIDTH, y2: HEIGHT - 1, class: "chart-axis" }),
    limit
      ? svg("line", {
          x1: 0,
          x2: WIDTH,
          y1: HEIGHT - (limit / top) * (HEIGHT - 4) - 2,
          y2: HEIGHT - (limit / top) * (HEIGHT - 4) - 2,
          class: "chart-limit",
        })
      : null,
    series.map((s) => svg("polyline", { points: points(s.values, top, span), class: `chart-line ${s.cls}` })),
  );
  const latest = series.map((s) =>
    h(
      "span",
      { class: "chart-key" },
      h("span", { class: `chart-swatch ${s.cls}`, "aria-hidden": "true" }),
      `${s.label} ${rate(s.values.length ? s.values[s.values.length - 1] : 0)}${unit}`,
    ),
  );
  return h(
    "figure",
    { class: "chart" },
    h("figcaption", {}, h("span", { class: "chart-title" }, title), limit ? h("span", { class: "chart-note" }, `limit ${rate(limit)}${unit}`) : null),
    drawing,
    h("div", { class: "chart-axis-labels", "aria-hidden": "true" }, h("span", {}, `${minutes} min ago`), h("span", {}, "now")),
    h("div", { class: "chart-keys" }, latest),
  );
}
