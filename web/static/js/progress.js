/* Live job progress: polls the session-authenticated status route of every element with data-status-url,
   updates its progress bar and counts, the job page's summary and class tiles (data-tile, data-tile-class,
   data-tile-bar) from the poll's `tiles`, and stops when the job has finished (reloading the job page for its
   results). */
(function () {
  "use strict";
  var FINISHED = ["done", "failed", "cancelled"];
  var STATUS_TEXT = {uploading: "Uploading", queued: "Queued", running: "Running", done: "Done", failed: "Failed",
                     cancelled: "Cancelled"};

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
    setText(root, "flagged", String(t.flagged));
    if (root.id !== "job-progress") { return; }  // the page's tiles follow the job page's own progress card
    setTile('[data-tile="scored"]', String(t.scored));
    document.querySelectorAll('[data-tile="failed"]').forEach(function (el) {
      var text = String(t.failed - (parseInt(el.getAttribute("data-offset"), 10) || 0));
      if (el.textContent !== text) { el.textContent = text; }
    });
    setTile('[data-tile="flagged"]', String(t.flagged));
    setTile('[data-tile="flag-context"]', "of " + t.scored + " scored" +
      (t.scored ? " (" + Math.round(100 * t.flagged / t.scored) + "%)" : ""));
    var classes = t.classes || {}, sum = 0;
    Object.keys(classes).forEach(function (c) { sum += classes[c]; });
    Object.keys(classes).forEach(function (c) {
      setTile('[data-tile-class="' + c + '"]', String(classes[c]));
      var fill = document.querySelector('[data-tile-bar="' + c + '"] .bar-fill');
      if (fill) { fill.setAttribute("width", (sum ? 100 * classes[c] / sum : 0).toFixed(2)); }
    });
  }

  function update(root, body) {
    var c = body.counts, pct = Math.round(body.progress * 1000) / 10, whole = Math.round(pct) + "%";
    var bar = root.querySelector('[data-role="bar"]');
    if (bar) { bar.value = pct; bar.textContent = whole; }
    setText(root, "percent", whole);
    setText(root, "total", String(c.total));
    setText(root, "scored", String(c.scored));
    setText(root, "failed", String(c.failed));
    var refused = parseInt(root.getAttribute("data-refused"), 10) || 0;  // files refused at upload: not images
    setText(root, "text", (c.scored + c.failed - refused) + " of " + (c.total - refused) + " images finished (" +
      whole + "): " + c.scored + " scored, " + (c.failed - refused) + " could not be scored" +
      (refused ? "; " + refused + (refused === 1 ? " file" : " files") + " refused at upload." : "."));
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
