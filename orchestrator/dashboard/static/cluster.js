/* Cluster page: capacity and use, the queue in admission order, usage per user. */
"use strict";

(() => {
  const {el} = orch;
  let cluster = orch.pageData("cluster-data");

  function meter(used, total) {
    const bar = el("span");
    bar.style.width = (total ? Math.min(100, (used / total) * 100) : 0).toFixed(1) + "%";
    return el("div", {class: "progress"}, el("div", {class: "progress-bar"}, bar));
  }

  function stat(label, used, total, hint) {
    return el("div", {class: "card stat"},
      el("div", {class: "label", text: label}),
      el("div", {class: "value"}, String(used), el("span", {class: "muted", text: " / " + total})),
      el("div", {class: "hint", text: hint}), meter(used, total));
  }

  function render() {
    const c = cluster;
    document.getElementById("cluster-note").textContent = c.capacity.nodes + " node" + (c.capacity.nodes === 1 ? "" : "s")
      + (c.jobs_url ? " · Ray " + c.jobs_url : "");
    document.getElementById("cluster-stats").replaceChildren(
      stat("GPUs in use", c.in_use.gpus, c.capacity.gpus, (c.capacity.gpus - c.in_use.gpus) + " free"),
      stat("CPUs in use", c.in_use.cpus, c.capacity.cpus, (c.capacity.cpus - c.in_use.cpus) + " free"),
      el("div", {class: "card stat"}, el("div", {class: "label", text: "Running"}),
        el("div", {class: "value", text: String((c.counts.running || 0) + (c.counts.pending || 0))}),
        el("div", {class: "hint", text: (c.counts.pending || 0) + " starting"})),
      el("div", {class: "card stat"}, el("div", {class: "label", text: "Queued"}),
        el("div", {class: "value", text: String(c.queued_total)}),
        el("div", {class: "hint", text: "admitted by priority, then age"})));
    document.getElementById("queue-note").textContent = c.queued_total > c.queue.length
      ? "first " + c.queue.length + " of " + c.queued_total : "";
    document.getElementById("queue-body").replaceChildren(...c.queue.map((q) => el("tr", {"data-job-id": q.id},
      el("td", {class: "num muted", text: String(q.position)}),
      el("td", {class: "job-cell"}, el("span", {class: "job-num", text: "#" + q.id}), el("a", {href: "/ui/jobs/" + q.id, text: q.name})),
      el("td", {text: q.owner}), el("td", {class: "num", text: String(q.gpus)}), el("td", {class: "num", text: String(q.cpus)}),
      el("td", {class: "num", text: String(q.priority)}), el("td", {class: "small", text: q.reason || ""}),
      el("td", {class: "small muted", text: orch.duration(q.queued_for)}))));
    document.getElementById("queue-empty").classList.toggle("hidden", c.queue.length > 0);
    const cap = c.user_gpu_cap;
    document.getElementById("cap-note").textContent = cap === null ? "no per-user GPU cap" : "per-user cap: " + cap + " GPUs";
    // Against the cap when there is one, else against the whole cluster.
    const scale = cap === null ? c.capacity.gpus : cap;
    document.getElementById("usage-body").replaceChildren(...c.usage.map((u) => el("tr", {"data-owner": u.owner},
      el("td", {}, u.owner, u.is_you ? " " : null, u.is_you ? el("span", {class: "tag", text: "you"}) : null),
      el("td", {class: "col-progress"},
        el("div", {class: "usage-text"}, String(u.gpus), el("span", {class: "muted", text: cap === null ? " of " + scale : " of cap " + cap})),
        meter(u.gpus, scale)),
      el("td", {class: "num", text: String(u.cpus)}))));
    document.getElementById("usage-empty").classList.toggle("hidden", c.usage.length > 0);
  }

  render();
  orch.poll(async () => { cluster = await orch.getJSON("/ui/api/cluster"); render(); }, 4000);
})();
