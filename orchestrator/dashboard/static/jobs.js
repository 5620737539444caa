/* Jobs page: the list, its filters and pages, kept live by polling /ui/api/jobs. */
"use strict";

(() => {
  const {el} = orch;
  const STATES = ["queued", "pending", "running", "succeeded", "failed", "cancelled"];
  const MAX_COMPARE = 5;
  let listing = orch.pageData("jobs-data");
  const params = new URLSearchParams(location.search);
  const view = {
    state: params.get("state") || "",
    owner: params.get("owner") || "",
    before: params.get("before") || "",
    after: params.get("after") || "",
  };
  const selected = new Set();

  function query() {
    const q = new URLSearchParams();
    for (const [key, value] of Object.entries(view)) if (value) q.set(key, value);
    return q.toString();
  }

  let latest = 0;  // answers to older requests (a slow poll, a filter changed since) are dropped

  async function load(push) {
    const ticket = ++latest;
    if (push) history.pushState(null, "", "/" + (query() ? "?" + query() : ""));
    const answer = await orch.getJSON("/ui/api/jobs?" + query());
    if (ticket !== latest) return;
    listing = answer;
    render();
  }

  function renderFilters() {
    const chips = document.getElementById("state-filter");
    const active = new Set(view.state ? view.state.split(",") : []);
    const chip = (label, value, count) => el("button", {
      class: "chip" + ((value ? active.has(value) : active.size === 0) ? " active" : ""),
      type: "button", "data-state": value || "all",
      onclick: () => {
        view.state = value && !active.has(value) ? value : "";
        view.before = view.after = "";
        load(true);
      },
    }, label, el("span", {class: "count", text: String(count)}));
    chips.replaceChildren(
      chip("All", "", listing.total),
      ...STATES.map((s) => chip(s[0].toUpperCase() + s.slice(1), s, listing.counts[s] || 0)));

    const select = document.getElementById("owner-filter");
    const owners = listing.owners.slice();
    if (view.owner && !owners.includes(view.owner)) owners.unshift(view.owner);
    select.replaceChildren(el("option", {value: "", text: "Everyone"}),
      ...owners.map((o) => el("option", {value: o, selected: o === view.owner, text: o})));
    select.value = view.owner;
  }

  function row(job) {
    const check = el("input", {
      type: "checkbox", "aria-label": "Select job " + job.id, checked: selected.has(job.id),
      onchange: (event) => {
        if (event.target.checked) selected.add(job.id); else selected.delete(job.id);
        updateCompare();
      },
    });
    const why = job.state === "queued" && job.wait_reason
      ? el("div", {class: "why", text: job.wait_reason})
      : job.state === "failed" && job.error ? el("div", {class: "why error", title: job.error, text: job.error}) : null;
    const ran = job.ran_for !== null ? orch.duration(job.ran_for) : null;
    return el("tr", {"data-job-id": job.id, "data-state": job.state, "data-owner": job.owner},
      el("td", {class: "col-check"}, check),
      el("td", {class: "job-cell"},
        el("div", {}, el("span", {class: "job-num", text: "#" + job.id}),
          el("a", {href: "/ui/jobs/" + job.id, text: job.name})),
        el("div", {class: "sub", title: job.model, text: job.objective + " · " + job.model})),
      el("td", {class: "state-cell"}, orch.badge(job.state), why),
      el("td", {text: job.owner}),
      el("td", {class: "col-progress"}, orch.progress(job.step, job.total_steps, job.state)),
      el("td", {class: "num", text: String(job.gpus)}),
      el("td", {class: "small nowrap"},
        el("div", {}, el("span", {class: "muted", text: "queued "}), orch.duration(job.queued_for)),
        ran ? el("div", {}, el("span", {class: "muted", text: "ran "}), ran) : null),
      el("td", {class: "num", text: orch.number(job.train_loss)}),
      el("td", {class: "num"}, orch.number(job.headline_value),
        el("span", {class: "metric-label", text: job.headline})));
  }

  function render() {
    renderFilters();
    const rows = listing.rows;
    document.getElementById("jobs-body").replaceChildren(...rows.map(row));
    document.getElementById("jobs-empty").classList.toggle("hidden", rows.length > 0);
    const running = listing.counts.running || 0;
    const queued = listing.counts.queued || 0;
    document.getElementById("jobs-summary").textContent =
      listing.total + " job" + (listing.total === 1 ? "" : "s") + " · " + running + " running · " + queued + " queued";
    const newer = document.getElementById("page-newer");
    const older = document.getElementById("page-older");
    newer.disabled = listing.newer === null;
    older.disabled = listing.older === null;
    document.getElementById("page-info").textContent = rows.length
      ? "#" + rows[0].id + " – #" + rows[rows.length - 1].id : "";
    updateCompare();
  }

  function updateCompare() {
    const button = document.getElementById("compare-selected");
    button.textContent = selected.size ? "Compare selected (" + selected.size + ")" : "Compare selected";
    button.disabled = selected.size < 2 || selected.size > MAX_COMPARE;
    button.title = selected.size > MAX_COMPARE ? "Compare at most " + MAX_COMPARE + " jobs" : "";
  }

  document.getElementById("owner-filter").addEventListener("change", (event) => {
    view.owner = event.target.value;
    view.before = view.after = "";
    load(true);
  });
  document.getElementById("page-newer").addEventListener("click", () => {
    view.after = String(listing.newer); view.before = "";
    load(true);
  });
  document.getElementById("page-older").addEventListener("click", () => {
    view.before = String(listing.older); view.after = "";
    load(true);
  });
  document.getElementById("compare-selected").addEventListener("click", () => {
    location.assign("/ui/compare?ids=" + [...selected].sort((a, b) => a - b).join(","));
  });
  window.addEventListener("popstate", () => {
    const p = new URLSearchParams(location.search);
    for (const key of Object.keys(view)) view[key] = p.get(key) || "";
    load(false);
  });

  render();
  // The first page follows new jobs as they arrive; a later page stays where it is.
  orch.poll(() => load(false), 3000);
})();
