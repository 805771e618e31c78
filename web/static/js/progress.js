/* Live job progress: polls the session-authenticated status route of every element with data-status-url,
   updates its progress bar and counts, the job page's summary and class tiles (data-tile, data-tile-class,
   data-tile-bar) from the poll's `tiles`, and stops when the job has finished (reloading the job page for its
   results). */
(function () {
  "use strict";
  var FINISHED = ["done", "failed", "cancelled"];
  var STATUS_TEXT = {uploading: "Uploading", queued: "Queued", running: "Running", done: "Done", failed: "Failed",
                     cancelled: "Cancelled"};

  function n(value) { return Number(value).toLocaleString("en-US"); }  // 1,500: as the pages and the CLI write it

  function setText(root, role, text) {
    var el = root.querySelector('[data-role="' + role + '"]');
    if (el && el.textContent !== text) { el.textContent = text; }
  }

  function setTile(selector, text) {
    document.querySelectorAll(selector).forEach(function (el) {
      if (el.textContent !== text) { el.textContent = text; }
    });
  }

  function updateTiles(root, body) {
    var t = body.tiles;
    if (!t) { return; }
    setText(root, "flagged", n(t.flagged));
    if (root.id !== "job-progress") { return; }  // the page's tiles follow the job page's own progress card
    setTile('[data-tile="scored"]', n(t.scored));
    setTile('[data-tile="failed"]', n(t.failed));  // not scored: refused files are not images (skinscan.jobs.counts)
    setTile('[data-tile="flagged"]', n(t.flagged));
    setTile('[data-tile="flag-context"]', "of " + n(t.scored) + " scored" +
      (t.scored ? " (" + Math.round(100 * t.flagged / t.scored) + "%)" : ""));
    var classes = t.classes || {}, sum = 0;
    Object.keys(classes).forEach(function (c) { sum += classes[c]; });
    Object.keys(classes).forEach(function (c) {
      setTile('[data-tile-class="' + c + '"]', n(classes[c]));
      var fill = document.querySelector('[data-tile-bar="' + c + '"] .bar-fill');
      if (fill) { fill.setAttribute("width", (sum ? 100 * classes[c] / sum : 0).toFixed(2)); }
    });
  }

  function update(root, body) {
    var c = body.counts, pct = Math.round(body.progress * 1000) / 10, whole = Math.round(pct) + "%";
    var bar = root.querySelector('[data-role="bar"]');
    if (bar) { bar.value = pct; bar.textContent = whole; }
    setText(root, "percent", whole);
    // The API's counts (skinscan.jobs.counts): total = images accepted, failed = not scored, refused apart.
    setText(root, "total", n(c.total));
    setText(root, "scored", n(c.scored));
    setText(root, "failed", n(c.failed));
    var refused = c.refused || 0;
    setText(root, "text", n(c.scored + c.failed) + " of " + n(c.total) + " images finished (" +
      whole + "): " + n(c.scored) + " scored, " + n(c.failed) + " could not be scored" +
      (refused ? "; " + n(refused) + (refused === 1 ? " file" : " files") + " refused at upload." : "."));
    var status = root.querySelector('[data-role="status"]');
    if (status && root.getAttribute("data-status") !== body.status) {
      var badge = document.createElement("span");
      badge.className = "badge badge-" + body.status;
      badge.textContent = STATUS_TEXT[body.status] || body.status;
      status.replaceChildren(badge);
    }
    root.setAttribute("data-status", body.status);
    updateTiles(root, body);
  }

  function watch(root) {
    var url = root.getAttribute("data-status-url"), delay = 1500;
    if (FINISHED.indexOf(root.getAttribute("data-status")) >= 0) { return; }
    function tick() {
      fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"})
        .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
        .then(function (body) {
          update(root, body);
          delay = 1500;
          if (FINISHED.indexOf(body.status) >= 0) {
            root.querySelectorAll("[data-hide-when-finished]").forEach(function (el) { el.hidden = true; });
            if (root.getAttribute("data-reload-when-done")) { window.setTimeout(function () { window.location.reload(); }, 800); }
            return;
          }
          window.setTimeout(tick, delay);
        })
        .catch(function () { delay = Math.min(delay * 2, 30000); window.setTimeout(tick, delay); });
    }
    window.setTimeout(tick, delay);
  }

  document.querySelectorAll("[data-status-url]").forEach(watch);
})();
