/* dermnode console: progressive enhancement only; every page works without it. No inline scripts (CSP). */
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;

  function worklist() {
    const seconds = parseFloat(body.dataset.refreshS || "5");
    const pause = document.getElementById("pause-refresh");
    const note = document.getElementById("live-note");
    const rows = document.getElementById("worklist-rows");
    let paused = false;
    let live = body.dataset.live === "1";
    if (pause) {
      pause.addEventListener("click", function () {
        paused = !paused;
        pause.setAttribute("aria-pressed", paused ? "true" : "false");
        pause.textContent = paused ? "Resume refresh" : "Pause refresh";
      });
    }
    let idleTicks = 0;
    async function refresh() {
      if (paused || document.hidden) return;
      if (!live && ++idleTicks % 4 !== 0) return;  // idle: look for new arrivals at a quarter of the rate
      try {
        const response = await fetch(window.location.href, { headers: { "X-Fragment": "rows" }, credentials: "same-origin" });
        if (!response.ok) return;
        const html = await response.text();
        const focused = document.activeElement && rows.contains(document.activeElement) ? document.activeElement.id : null;
        rows.innerHTML = html;
        if (focused) { const again = document.getElementById(focused); if (again) again.focus(); }
        const wasLive = live;
        live = response.headers.get("X-Dermnode-Live") === "1";
        body.dataset.live = live ? "1" : "0";
        if (pause) pause.hidden = false;
        if (note && live !== wasLive) {
          note.textContent = live ? "Jobs are queued or running: this list refreshes every " + seconds + " s."
                                  : "All jobs finished.";
        }
      } catch (e) { /* the next tick tries again */ }
    }
    window.setInterval(refresh, Math.max(1, seconds) * 1000);
  }

  function result() {
    const toggle = document.getElementById("toggle-outline");
    const overlay = document.getElementById("overlay-img");
    const source = document.getElementById("source-img");
    if (toggle && overlay) {
      if (!source) { toggle.hidden = true; }
      toggle.addEventListener("click", function () {
        const shown = toggle.getAttribute("aria-pressed") === "true";
        overlay.classList.toggle("hidden", shown);
        toggle.setAttribute("aria-pressed", shown ? "false" : "true");
        toggle.textContent = shown ? "Show outline" : "Hide outline";
      });
    }
    const stack = document.getElementById("image-stack");
    const level = document.getElementById("zoom-level");
    let zoom = 1;
    function setZoom(z) {
      zoom = Math.min(8, Math.max(1, z));
      if (stack) stack.style.width = (zoom * 100) + "%";
      if (level) level.textContent = Math.round(zoom * 100) + " %";
    }
    const zin = document.getElementById("zoom-in"), zout = document.getElementById("zoom-out"), zfit = document.getElementById("zoom-fit");
    if (zin) zin.addEventListener("click", function () { setZoom(zoom * 1.5); });
    if (zout) zout.addEventListener("click", function () { setZoom(zoom / 1.5); });
    if (zfit) zfit.addEventListener("click", function () { setZoom(1); });
    const frame = document.getElementById("image-frame");
    if (frame) frame.addEventListener("keydown", function (e) {
      if (e.key === "+" || e.key === "=") { setZoom(zoom * 1.5); e.preventDefault(); }
      if (e.key === "-") { setZoom(zoom / 1.5); e.preventDefault(); }
      if (e.key === "0") { setZoom(1); e.preventDefault(); }
    });
    if (body.dataset.waiting === "1") {
      const uid = body.dataset.uid;
      const started = body.dataset.status;
      const text = document.getElementById("waiting-text");
      const poll = async function () {
        try {
          const r = await fetch("/results/" + encodeURIComponent(uid) + "/state", { credentials: "same-origin" });
          if (r.ok) {
            const state = await r.json();
            if ((state.result && state.status !== "queued" && state.status !== "running") || state.status === "dead") {
              window.location.reload();
              return;
            }
            if (state.status !== started && text) text.textContent = "The image is " + state.status + ". This page fills in when the job finishes.";
          }
        } catch (e) { /* try again */ }
        window.setTimeout(poll, 1000);
      };
      window.setTimeout(poll, 1000);
    }
  }

  function upload() {
    const form = document.getElementById("upload-form");
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("files");
    const list = document.getElementById("file-list");
    const error = document.getElementById("client-error");
    const progress = document.getElementById("upload-progress");
    const button = document.getElementById("upload-button");
    if (!form || !zone || !input) return;
    const maxBytes = parseInt(form.dataset.maxBytes, 10);
    const maxFiles = parseInt(form.dataset.maxFiles, 10);
    function show() {
      list.textContent = "";
      const problems = [];
      Array.from(input.files).forEach(function (f) {
        const li = document.createElement("li");
        li.textContent = f.name + " (" + (f.size / 1048576).toFixed(1) + " MB)";
        list.appendChild(li);
        if (f.size > maxBytes) problems.push(f.name + ": too large, the limit is " + (maxBytes / 1048576) + " MB");
      });
      if (input.files.length > maxFiles) problems.push("at most " + maxFiles + " files per upload");
      error.hidden = problems.length === 0;
      error.textContent = problems.join("; ");
      return problems.length === 0;
    }
    input.addEventListener("change", show);
    ["dragenter", "dragover"].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.add("dragging"); });
    });
    ["dragleave", "drop"].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.remove("dragging"); });
    });
    zone.addEventListener("drop", function (e) {
      if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
    });
    form.addEventListener("submit", function (e) {
      if (!show()) { e.preventDefault(); return; }
      button.disabled = true;
      progress.textContent = "Uploading…";
    });
  }

  if (page === "worklist") worklist();
  if (page === "result") result();
  if (page === "upload") upload();
})();
