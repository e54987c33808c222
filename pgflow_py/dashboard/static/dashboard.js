// pgflow dashboard: refreshes the page's live part in place, and sends retry and cancel.
// The live part comes from the server as HTML it has escaped; nothing here builds markup
// from data.
(() => {
  "use strict";
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  const flash = document.getElementById("flash");
  if (!live) return;
  const every = Number(live.dataset.refresh || 0);
  let busy = false;
  let timer = null;

  function show(text, isError) {
    flash.textContent = text;
    flash.className = isError ? "flash error" : "flash";
    flash.hidden = false;
    clearTimeout(show.timer);
    show.timer = setTimeout(() => { flash.hidden = true; }, isError ? 15000 : 5000);
  }

  function mark(value, title) {
    if (!state) return;
    state.dataset.state = value;
    state.textContent = value === "ok" ? "live" : value;
    state.title = title || "";
  }

  function swap(html) {
    // Keep what the reader opened or closed (tracebacks, outputs) as it was.
    const opened = new Map();
    live.querySelectorAll("details[id]").forEach((d) => opened.set(d.id, d.open));
    live.innerHTML = html;
    opened.forEach((open, id) => {
      const d = document.getElementById(id);
      if (d) d.open = open;
    });
  }

  async function refresh(force) {
    if (busy || (!force && document.hidden)) return;
    const selection = window.getSelection();
    if (!force && selection && !selection.isCollapsed && live.contains(selection.anchorNode)) {
      return; // the reader is selecting text: do not pull it from under them
    }
    busy = true;
    try {
      const answer = await fetch(location.href, {
        headers: { "X-Pgflow-Partial": "1" }, cache: "no-store", credentials: "same-origin",
      });
      if (answer.ok || answer.status === 404) {
        swap(await answer.text());
        mark("ok", "updated " + new Date().toLocaleTimeString());
      } else {
        mark("error", "the server answered " + answer.status);
      }
    } catch (err) {
      mark("offline", String(err));
    } finally {
      busy = false;
    }
  }

  live.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      const answer = await fetch(button.dataset.url, {
        method: "POST", headers: { "X-Pgflow": "1" }, credentials: "same-origin",
      });
      const body = await answer.json().catch(() => ({}));
      if (answer.ok) {
        show(button.dataset.action + ": the run is now " + body.status, false);
      } else {
        show(button.dataset.action + " refused: " + (body.error || answer.statusText), true);
      }
    } catch (err) {
      show(button.dataset.action + " failed: " + err, true);
    }
    await refresh(true);
  });

  if (every > 0) {
    timer = setInterval(refresh, every);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh(true);
    });
    mark("ok", "refreshes every " + every / 1000 + " s");
  }
  window.pgflowDashboard = { refresh: () => refresh(true), timer };
})();
