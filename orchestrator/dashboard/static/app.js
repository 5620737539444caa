/* orch dashboard: helpers every page shares.
 *
 * The DOM is built with createElement/textContent only: job names, owners, log lines and
 * errors are user-written and are never parsed as HTML. */
"use strict";

const orch = (() => {
  /** el("td", {class: "num", title: "x"}, child, "text", ...) */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function pageData(id) {
    return JSON.parse(document.getElementById(id).textContent);
  }

  function cookie(name) {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === name) return decodeURIComponent(rest.join("="));
    }
    return "";
  }

  function toLogin() {
    const here = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(here));
  }

  async function getJSON(url) {
    const response = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (response.status === 401) { toLogin(); throw new Error("signed out"); }
    if (!response.ok) throw new Error(await errorText(response));
    return response.json();
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return body.detail || response.statusText;
    } catch (_) {
      return response.statusText || String(response.status);
    }
  }

  /** POST to the API with the session's CSRF value echoed in the header (double submit). */
  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Orch-CSRF": cookie("orch_csrf")},
      body: JSON.stringify(body || {}),
    });
    let data = null;
    try { data = await response.json(); } catch (_) { /* no body */ }
    return {ok: response.ok, status: response.status, data,
            error: response.ok ? null : (data && data.detail) || response.statusText};
  }

  // -- formatting ----------------------------------------------------------------------
  function number(value) {
    if (value === null || value === undefined) return "–";
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
    return Number(value.toPrecision(4)).toString();
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.round(seconds);
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + String(s % 60).padStart(2, "0") + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h " + String(m % 60).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  /** "14:03:22" today, "Mar 3, 14:03" otherwise, in the browser's time zone. */
  function time(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    const today = new Date().toDateString() === date.toDateString();
    return today
      ? date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"})
      : date.toLocaleString([], {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"});
  }

  function ago(iso) {
    if (!iso) return "";
    return duration((Date.now() - new Date(iso).getTime()) / 1000) + " ago";
  }

  function badge(state) {
    return el("span", {class: "badge badge-" + state, "data-state": state, text: state});
  }

  /** A progress bar with "step / total · N%" under it (`compact`: just the percentage). */
  function progress(step, total, state, compact) {
    const known = total && total > 0;
    const fraction = known && step !== null ? Math.min(1, step / total) : 0;
    const label = step === null || step === undefined
      ? (known ? "0 / " + total : "–")
      : (known ? step + " / " + total : "step " + step);
    const bar = el("span");
    bar.style.width = (fraction * 100).toFixed(1) + "%";
    return el("div", {class: "progress progress-" + (state || "")},
      el("div", {class: "progress-bar"}, bar),
      el("div", {class: "progress-text", text: compact
        ? (known ? Math.round(fraction * 100) + "% of " + total + " steps" : "total unknown")
        : label + (known && step !== null ? "  ·  " + Math.round(fraction * 100) + "%" : "")}));
  }

  // -- feedback ---------------------------------------------------------------------------
  function toast(message, kind) {
    const node = el("div", {class: "toast " + (kind || ""), role: "status", text: message});
    document.getElementById("toasts").append(node);
    setTimeout(() => node.remove(), 5000);
  }

  /** A modal yes/no question; resolves to true when confirmed. */
  function confirmDialog(title, body, confirmLabel) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-body").textContent = body;
    document.getElementById("confirm-yes").textContent = confirmLabel || "Confirm";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), {once: true});
      dialog.showModal();
    });
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      // No clipboard API (plain http on another host): select the text for Ctrl+C.
      const area = el("textarea", {}, text);
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    if (button) {
      const before = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = before; }, 1200);
    }
  }

  /** Run `fn` every `ms` while the tab is visible; errors mark the live dot stale. */
  function poll(fn, ms) {
    let timer = null;
    let stopped = false;
    const dot = document.getElementById("live-indicator");
    async function tick() {
      if (stopped) return;
      if (!document.hidden) {
        try {
          await fn();
          if (dot) dot.classList.remove("stale");
        } catch (err) {
          if (dot) dot.classList.add("stale");
        }
      }
      if (!stopped) timer = setTimeout(tick, ms);
    }
    timer = setTimeout(tick, ms);
    return {stop() { stopped = true; clearTimeout(timer); }};
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-copy-from]");
    if (button) copy(document.getElementById(button.dataset.copyFrom).textContent, button);
  });

  return {el, pageData, cookie, getJSON, post, number, duration, bytes, time, ago, badge,
          progress, toast, confirmDialog, copy, poll, toLogin};
})();
