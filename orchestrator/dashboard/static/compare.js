/* Compare page: pick 2 to 5 jobs, overlay their curves (one chart per metric). */
"use strict";

(() => {
  const {el} = orch;
  const page = orch.pageData("compare-data");
  const picked = new Set(page.chosen);
  const list = document.getElementById("picker-list");
  const search = document.getElementById("compare-search");

  function renderPicker() {
    const needle = search.value.trim().toLowerCase();
    const rows = page.picker.filter((j) => !needle || ("#" + j.id + " " + j.name + " " + j.owner).toLowerCase().includes(needle));
    // Jobs already chosen but older than the list still show, at the top.
    const listed = new Set(page.picker.map((j) => j.id));
    const extra = page.chosen.filter((id) => !listed.has(id)).map((id) => ({id, name: "job " + id, state: "", owner: "", objective: ""}));
    list.replaceChildren(...extra.concat(rows).map((j) => el("li", {},
      el("label", {},
        el("input", {type: "checkbox", value: j.id, checked: picked.has(j.id), "data-job-id": j.id,
          onchange: (event) => {
            if (event.target.checked) picked.add(j.id); else picked.delete(j.id);
            updateCount();
          }}),
        el("div", {},
          el("div", {class: "pick-name"}, el("span", {class: "muted", text: "#" + j.id + " "}), j.name),
          el("div", {class: "pick-sub"}, j.state ? orch.badge(j.state) : null, " " + [j.owner, j.objective].filter(Boolean).join(" · ")))))));
    updateCount();
  }

  function updateCount() {
    const n = picked.size;
    document.getElementById("picked-count").textContent = n + " of " + page.max + " picked";
    const go = document.getElementById("compare-go");
    go.disabled = n < 2 || n > page.max;
    go.textContent = n > page.max ? "At most " + page.max + " jobs" : n ? "Compare " + n + " jobs" : "Compare";
  }

  search.addEventListener("input", renderPicker);
  document.getElementById("compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.assign("/ui/compare?ids=" + [...picked].sort((a, b) => a - b).join(","));
  });

  async function draw() {
    const empty = document.getElementById("compare-empty");
    if (page.chosen.length < 2) { empty.classList.remove("hidden"); return; }
    const data = await orch.getJSON("/ui/api/compare?ids=" + page.chosen.join(","));
    const colors = {};
    data.jobs.forEach((j, i) => { colors[j.id] = orchCharts.PALETTE[i % orchCharts.PALETTE.length]; });
    document.getElementById("compare-legend").replaceChildren(...data.jobs.map((j) => el("span", {class: "legend-item"},
      el("span", {class: "swatch", style: "background:" + colors[j.id]}),
      el("a", {href: "/ui/jobs/" + j.id, text: "#" + j.id + " " + j.name}), orch.badge(j.state))));
    const box = document.getElementById("charts");
    box.replaceChildren();
    for (const metric of data.metrics) {
      const series = data.jobs.filter((j) => data.series[j.id][metric]).map((j) => ({
        key: metric + "@" + j.id, label: "#" + j.id + " " + j.name, color: colors[j.id],
        steps: data.series[j.id][metric].steps, values: data.series[j.id][metric].values}));
      orchCharts.create(box, {id: metric, title: metric, subtitle: series.length + " of " + data.jobs.length + " jobs", series});
    }
    if (!data.metrics.length) box.append(el("div", {class: "card chart-card skeleton", text: "None of these jobs recorded metrics yet."}));
  }

  renderPicker();
  draw().catch((err) => orch.toast("Could not load curves: " + err.message, "error"));
})();
