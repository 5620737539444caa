/* Charts: metric curves against step, drawn with the vendored uPlot.
 *
 * A chart holds several series, each its own (steps, values) arrays as the server sent
 * them (already downsampled to a bounded number of points); uPlot wants one shared x
 * array, so the series are aligned on the union of their steps, with gaps spanned. */
"use strict";

const orchCharts = (() => {
  const {el} = orch;
  const PALETTE = ["#4f46e5", "#f79009", "#17b26a", "#e31b54", "#0ba5ec", "#7a5af8", "#15b79e", "#667085"];
  const SERIES_COLOR = {train_loss: "#4f46e5", eval_loss: "#f79009", learning_rate: "#15b79e", grad_norm: "#7a5af8"};
  const SUPERSEDED = "#98a2b3";
  const registry = {};  // chart id -> chart; read by the browser tests too
  window.orchCharts = registry;

  function color(name, index) {
    return SERIES_COLOR[name] || PALETTE[index % PALETTE.length];
  }

  /** [{steps, values}, ...] -> uPlot data: [xs, ys1, ys2, ...] with nulls where a series has no point. */
  function align(list) {
    const xs = [...new Set(list.flatMap((s) => s.steps))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const ys = list.map((s) => {
      const column = new Array(xs.length).fill(null);
      s.steps.forEach((step, i) => { column[index.get(step)] = s.values[i]; });
      return column;
    });
    return [xs, ...ys];
  }

  function axisValues(u, values) {
    return values.map((v) => (v === null ? "" : orch.number(v)));
  }

  /**
   * create(parent, {id, title, subtitle, series: [{key, label, steps, values, color?, superseded?}]})
   * A card with a chart; returns {set(series), append(key, steps, values), counts()}.
   */
  function create(parent, spec) {
    const body = el("div", {class: "chart-body"});
    const subtitle = el("span", {class: "muted", text: spec.subtitle || ""});
    const card = el("div", {class: "card chart-card", "data-chart": spec.id},
      el("div", {class: "chart-head"}, el("h3", {text: spec.title}), subtitle), body);
    parent.append(card);
    let series = spec.series.map((s) => ({...s, steps: s.steps.slice(), values: s.values.slice()}));
    let plot = null;

    function options(width) {
      return {
        width, height: 240,
        scales: {x: {time: false}},
        legend: {live: true},
        cursor: {drag: {x: true, y: false}, points: {size: 7}},
        axes: [
          {stroke: "#667085", grid: {stroke: "#f0f1f4"}, ticks: {stroke: "#e4e7ec"}, label: "step", labelSize: 18, font: "11px system-ui", labelFont: "11px system-ui"},
          {stroke: "#667085", grid: {stroke: "#f0f1f4"}, ticks: {stroke: "#e4e7ec"}, size: 56, values: axisValues, font: "11px system-ui"},
        ],
        series: [{label: "step"}, ...series.map((s, i) => s.superseded
          ? {label: s.label, stroke: SUPERSEDED, width: 0, paths: () => null,
             points: {show: true, size: 4, stroke: SUPERSEDED, fill: SUPERSEDED}, value: (u, v) => orch.number(v)}
          : {label: s.label, stroke: s.color || color(s.key, i), width: 1.75, spanGaps: true,
             points: {show: s.steps.length <= 60, size: 5}, value: (u, v) => orch.number(v)})],
      };
    }

    function draw() {
      const width = Math.max(280, body.clientWidth || card.clientWidth - 32);
      if (plot) plot.destroy();
      plot = new uPlot(options(width), align(series), body);
      chart.plot = plot;
    }

    const chart = {
      id: spec.id, card, plot: null,
      /** Replace every series (a full reload, e.g. superseded points toggled). */
      set(next) {
        series = next.map((s) => ({...s, steps: s.steps.slice(), values: s.values.slice()}));
        draw();
      },
      /** Add points after a series' last step (a live update); false if the series is unknown. */
      append(key, steps, values) {
        const target = series.find((s) => s.key === key && !s.superseded);
        if (!target) return false;
        const last = target.steps.length ? target.steps[target.steps.length - 1] : -Infinity;
        steps.forEach((step, i) => {
          if (step > last) { target.steps.push(step); target.values.push(values[i]); }
        });
        plot.setData(align(series));
        return true;
      },
      keys() { return series.filter((s) => !s.superseded).map((s) => s.key); },
      /** key -> points drawn (non-null values), per live series and superseded series. */
      counts() {
        const out = {};
        series.forEach((s, i) => {
          out[(s.superseded ? "superseded:" : "") + s.key] = plot.data[i + 1].filter((v) => v !== null).length;
        });
        return out;
      },
      subtitle(text) { subtitle.textContent = text; },
      destroy() { if (plot) plot.destroy(); card.remove(); delete registry[spec.id]; },
    };
    registry[spec.id] = chart;
    draw();
    new ResizeObserver(() => {
      const width = Math.max(280, body.clientWidth);
      if (plot && Math.abs(plot.width - width) > 4) plot.setSize({width, height: 240});
    }).observe(body);
    return chart;
  }

  return {create, color, registry, PALETTE};
})();
