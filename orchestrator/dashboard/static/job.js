/* Job page: state, stats, live curves, checkpoints, timeline, attempts and the log tail. */
"use strict";

(() => {
  const {el} = orch;
  let job = orch.pageData("job-data");
  const jobId = job.id;
  const charts = {};  // panel id -> chart
  let curves = null;  // the last full curves answer
  let lastStep = null;
  let attempts = job.attempts;
  let logOffset = null;
  const ACTIVE = new Set(["queued", "pending", "running"]);
  const isActive = () => ACTIVE.has(job.state);

  // -- header, stats, banners --------------------------------------------------------------
  function stat(label, value, hint, extra) {
    return el("div", {class: "card stat"},
      el("div", {class: "label", text: label}),
      el("div", {class: "value", text: value}),
      hint ? el("div", {class: "hint", text: hint}) : null, extra || null);
  }

  function renderHeader() {
    document.getElementById("job-state").replaceChildren(orch.badge(job.state));
    document.getElementById("cancel-btn").classList.toggle("hidden", !job.can_cancel);
    document.getElementById("resume-btn").classList.toggle("hidden", !job.can_resume);
    document.getElementById("live-indicator").classList.toggle("hidden", !isActive());
    const step = job.step === null ? (job.total_steps ? "0" : "–") : String(job.step);
    const total = job.total_steps ? " / " + job.total_steps : "";
    document.getElementById("job-stats").replaceChildren(
      stat("Progress", step + total, job.eta_seconds !== null && job.eta_seconds !== undefined
           ? "ETA " + orch.duration(job.eta_seconds) : null,
           orch.progress(job.step, job.total_steps, job.state, true)),
      stat("Train loss", orch.number(job.train_loss), job.step !== null ? "at step " + job.step : null),
      stat(job.headline, orch.number(job.headline_value), "main metric for " + job.objective),
      stat("Resources", job.gpus + " GPU" + (job.gpus === 1 ? "" : "s"), job.cpus + " CPUs · priority " + job.priority),
      stat(job.ran_for !== null ? "Ran for" : "Queued for",
           orch.duration(job.ran_for !== null ? job.ran_for : job.queued_for),
           job.ran_for !== null ? "queued " + orch.duration(job.queued_for) : "since " + orch.time(job.created_at)),
      stat("Attempts", job.attempts + " of " + job.max_attempts, job.parent_job_id ? "resumes job #" + job.parent_job_id : null));
    const banner = document.getElementById("job-banner");
    const parts = [];
    if (job.state === "queued" && job.wait_reason) {
      parts.push(el("div", {class: "banner banner-info", "data-testid": "wait-reason"},
        el("strong", {text: "In the queue: "}), job.wait_reason));
    }
    if (job.error_full) parts.push(el("div", {class: "banner banner-error", text: job.error_full}));
    if (job.resumed_by && job.resumed_by.length) {
      parts.push(el("div", {class: "banner banner-info"}, "Continued by ",
        ...job.resumed_by.flatMap((id, i) => [i ? ", " : "", el("a", {href: "/ui/jobs/" + id, text: "job #" + id})])));
    }
    banner.replaceChildren(...parts);
  }

  function renderCheckpoints() {
    const rows = job.checkpoints.map((c) => {
      const tags = [el("span", {class: "tag" + (c.kind === "final" ? " tag-final" : ""), text: c.kind})];
      if (c.is_best) tags.push(el("span", {class: "tag tag-best", text: "best"}));
      if (c.is_latest) tags.push(el("span", {class: "tag tag-latest", text: "latest"}));
      const metrics = Object.entries(c.metrics).map(([k, v]) =>
        el("div", {}, el("span", {text: k + " "}), orch.number(v)));
      return el("tr", {"data-step": c.step},
        el("td", {class: "num", text: String(c.step)}),
        el("td", {}, ...tags.flatMap((t) => [t, " "])),
        el("td", {class: "num", text: orch.bytes(c.size_bytes)}),
        el("td", {}, el("div", {class: "kv"}, ...metrics)),
        el("td", {}, el("div", {class: "path-cell"},
          el("code", {title: c.path, text: c.path}),
          el("button", {class: "btn btn-ghost btn-sm", type: "button", title: "Copy path",
                        onclick: (e) => orch.copy(c.path, e.currentTarget)}, "Copy"))));
    });
    document.getElementById("checkpoints-body").replaceChildren(...rows);
    document.getElementById("checkpoints-table").classList.toggle("hidden", rows.length === 0);
    document.getElementById("checkpoints-empty").classList.toggle("hidden", rows.length > 0);
  }

  function renderTimeline() {
    const items = job.events.slice().reverse().map((e) => el("li", {class: "to-" + e.to},
      el("div", {class: "when"}, orch.time(e.at) + " · ",
        e.from ? e.from + " → " : "", el("strong", {text: e.to}),
        e.user ? el("span", {class: "who", text: "by " + e.user}) : null),
      el("div", {class: "what", text: e.reason})));
    document.getElementById("timeline").replaceChildren(...items);
    const attemptRows = job.attempt_history.map((a) => el("tr", {},
      el("td", {text: String(a.attempt)}), el("td", {}, el("code", {text: a.submission_id})),
      el("td", {text: orch.time(a.started_at)}), el("td", {text: orch.time(a.ended_at)}),
      el("td", {}, orch.badge(a.outcome)), el("td", {class: "small", text: a.cause || ""})));
    document.getElementById("attempts-body").replaceChildren(
      ...(attemptRows.length ? attemptRows : [el("tr", {}, el("td", {colspan: 6, class: "muted", text: "Not admitted yet."}))]));
  }

  function renderAll() {
    renderHeader();
    renderCheckpoints();
    renderTimeline();
  }

  // -- curves -------------------------------------------------------------------------------
  const showSuperseded = document.getElementById("show-superseded");

  function panelSeries(panel, data) {
    const list = panel.series.filter((key) => data.series[key]).map((key) => ({
      key, label: key, steps: data.series[key].steps, values: data.series[key].values}));
    for (const key of panel.series) {
      const old = data.superseded[key];
      if (old) list.push({key, label: key + " (superseded)", steps: old.steps, values: old.values, superseded: true});
    }
    return list;
  }

  function subtitle(panel, data) {
    return panel.series.map((key) => {
      const shown = data.series[key] ? data.series[key].steps.length : 0;
      const total = data.counts[key] || 0;
      return shown < total ? key + ": " + shown + " of " + total + " points" : "";
    }).filter(Boolean).join(" · ");
  }

  async function loadCurves() {
    const data = await orch.getJSON("/ui/api/jobs/" + jobId + "/curves" + (showSuperseded.checked ? "?all=true" : ""));
    curves = data;
    lastStep = data.last_step;
    attempts = data.attempts;
    const box = document.getElementById("charts");
    for (const chart of Object.values(charts)) chart.destroy();
    for (const key of Object.keys(charts)) delete charts[key];
    box.replaceChildren();
    if (!data.panels.length) {
      box.append(el("div", {class: "card chart-card skeleton wide", text: isActive()
        ? "No metrics yet: curves appear with the first logged step." : "This job recorded no metrics."}));
    }
    for (const panel of data.panels) {
      charts[panel.id] = orchCharts.create(box, {id: panel.id, title: panel.title,
        subtitle: subtitle(panel, data), series: panelSeries(panel, data)});
    }
    const note = document.getElementById("chain-note");
    note.replaceChildren();
    if (data.chain.length > 1) {
      note.append("One curve across resumes: ", ...data.chain.flatMap((seg, i) => [
        i ? " → " : "",
        seg.job_id === jobId ? el("strong", {text: "#" + seg.job_id}) : el("a", {href: "/ui/jobs/" + seg.job_id, text: "#" + seg.job_id}),
        seg.until_step !== null ? " (to step " + seg.until_step + ")" : ""]));
    }
  }

  /** New points since the last one drawn; a new attempt (a retry rewrites steps) reloads all. */
  async function updateCurves() {
    if (curves === null || lastStep === null || job.attempts !== attempts) return loadCurves();
    const data = await orch.getJSON("/ui/api/jobs/" + jobId + "/curves?after=" + lastStep);
    const keys = Object.keys(data.series);
    if (!keys.length) return;
    const known = new Set(Object.values(charts).flatMap((c) => c.keys()));
    // A metric no chart has yet (the first evaluation, say): redraw everything.
    if (keys.some((key) => !known.has(key))) return loadCurves();
    for (const key of keys) {
      const points = data.series[key];
      for (const chart of Object.values(charts)) chart.append(key, points.steps, points.values);
      curves.counts[key] = (curves.counts[key] || 0) + data.counts[key];
    }
    lastStep = data.last_step;
    // Appending keeps every new point; past twice the bound, downsample again.
    const biggest = Math.max(...Object.values(charts).map((c) => Math.max(...Object.values(c.counts()))));
    if (biggest > 2 * curves.max_points) return loadCurves();
  }

  showSuperseded.addEventListener("change", () => loadCurves());

  // -- logs ---------------------------------------------------------------------------------
  const logBox = document.getElementById("log");
  async function loadLogs() {
    const data = await orch.getJSON("/ui/api/jobs/" + jobId + "/logs" + (logOffset === null ? "" : "?offset=" + logOffset));
    if (logOffset === null) {
      logBox.textContent = data.text;
      document.getElementById("log-note").textContent = data.truncated
        ? "The last 64 KB; `orch logs " + jobId + "` prints everything." : "";
      if (!data.text) logBox.textContent = isActive() ? "Waiting for the first log line…" : "No log was recorded.";
    } else if (data.text) {
      if (logBox.dataset.empty !== "no") logBox.textContent = "";
      logBox.append(document.createTextNode(data.text));
    }
    if (data.text) logBox.dataset.empty = "no";
    logOffset = data.offset;
    if (document.getElementById("log-follow").checked) logBox.scrollTop = logBox.scrollHeight;
  }

  // -- actions ------------------------------------------------------------------------------
  async function refresh() {
    job = await orch.getJSON("/ui/api/jobs/" + jobId);
    renderAll();
  }

  document.getElementById("cancel-btn").addEventListener("click", async () => {
    const ok = await orch.confirmDialog("Cancel job #" + jobId + "?",
      "A queued job never starts; a running one stops now and frees its GPUs. Its checkpoints stay, so it can be resumed.",
      "Cancel job");
    if (!ok) return;
    const result = await orch.post("/jobs/" + jobId + "/cancel");
    if (result.ok) orch.toast(result.data.message);
    else orch.toast("Cancel refused: " + result.error, "error");
    await refresh();
  });

  document.getElementById("resume-btn").addEventListener("click", async () => {
    const ok = await orch.confirmDialog("Resume job #" + jobId + "?",
      "A new job continues from the latest checkpoint, with the same spec.", "Resume");
    if (!ok) return;
    const result = await orch.post("/jobs/" + jobId + "/resume");
    if (result.ok) location.assign("/ui/jobs/" + result.data.id);
    else orch.toast("Resume refused: " + result.error, "error");
  });

  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      for (const p of document.querySelectorAll(".tab-panel")) p.classList.toggle("hidden", p.dataset.panel !== tab.dataset.tab);
    });
  }

  renderAll();
  loadCurves().catch((err) => orch.toast("Could not load curves: " + err.message, "error"));
  loadLogs().catch(() => {});
  // Live while the job is active; a finished job is polled slowly (someone may resume it).
  let wasActive = isActive();
  orch.poll(async () => {
    if (!isActive() && !wasActive) return refresh();
    await refresh();
    await Promise.all([updateCurves(), loadLogs()]);
    wasActive = isActive();
  }, 2000);
})();
