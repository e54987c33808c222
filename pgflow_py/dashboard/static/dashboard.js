// pgflow dashboard: refreshes the page's live part in place, and sends the actions (retry,
// cancel, retry all failed). The live part comes from the server as HTML it has escaped;
// nothing here builds markup from data.
(() => {
  "use strict";
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  const flash = document.getElementById("flash");
  if (!live) return;
  const every = Number(live.dataset.refresh || 0);
  let inFlight = false;
  let again = false; // a refresh was asked for while one was in flight
  let sent = 0; // requests sent; an answer to a request older than the last action is dropped
  let actedAt = 0;
  let last = null; // the last HTML put in place

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
    if (html === last) return; // nothing changed: keep the page exactly as it is
    last = html;
    // Keep what the reader did: opened or closed sections, scrolled boxes, focus.
    const opened = new Map();
    live.querySelectorAll("details[id]").forEach((d) => opened.set(d.id, d.open));
    const scrolled = new Map();
    live.querySelectorAll("[data-keep-scroll][id]").forEach((e) => {
      scrolled.set(e.id, [e.scrollLeft, e.scrollTop]);
    });
    const focused = document.activeElement && live.contains(document.activeElement)
      ? document.activeElement.id || null : null;
    live.innerHTML = html;
    opened.forEach((open, id) => {
      const d = document.getElementById(id);
      if (d) d.open = open;
    });
    scrolled.forEach(([left, top], id) => {
      const e = document.getElementById(id);
      if (e) { e.scrollLeft = left; e.scrollTop = top; }
    });
    if (focused) {
      const e = document.getElementById(focused);
      if (e) e.focus({ preventScroll: true });
    }
  }

  async function refresh(force) {
    if (!force && document.hidden) return;
    if (inFlight) { again = true; return; }
    const selection = window.getSelection();
    if (!force && selection && !selection.isCollapsed && live.contains(selection.anchorNode)) {
      return; // the reader is selecting text: do not pull it from under them
    }
    inFlight = true;
    const number = ++sent;
    try {
      const answer = await fetch(location.href, {
        headers: { "X-Pgflow-Partial": "1" }, cache: "no-store", credentials: "same-origin",
      });
      // Only our own fragments go in: not a login page a proxy put in between.
      if (answer.headers.get("X-Pgflow-Partial") !== "1") {
        mark("error", "the server answered " + answer.status + " without the page's part");
      } else if (number > actedAt) {
        swap(await answer.text());
        mark("ok", "updated " + new Date().toLocaleTimeString());
      }
    } catch (err) {
      mark("offline", String(err));
    } finally {
      inFlight = false;
      if (again) { again = false; refresh(true); }
    }
  }

  live.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button || button.disabled) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    actedAt = sent; // answers to requests sent before now show the state before the action
    try {
      const answer = await fetch(button.dataset.url, {
        method: "POST", headers: { "X-Pgflow": "1" }, credentials: "same-origin",
      });
      const body = await answer.json().catch(() => ({}));
      if (!answer.ok) {
        show(button.dataset.action + " refused: " + (body.error || answer.statusText), true);
      } else if (body.status !== undefined) {
        show(button.dataset.action + ": the run is now " + body.status, false);
      } else {
        show(button.dataset.action + ": " + body.retried + " run(s) queued again", false);
      }
    } catch (err) {
      show(button.dataset.action + " failed: " + err, true);
    }
    button.disabled = false;
    await refresh(true);
  });

  if (every > 0) {
    setInterval(refresh, every);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh(true);
    });
    mark("ok", "refreshes every " + every / 1000 + " s");
  }
})();
