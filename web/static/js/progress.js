/* Live job progress: polls the session-authenticated status route of every element with data-status-url,
   updates its progress bar and counts, and stops when the job is done (reloading the job page for its results). */
(function () {
  "use strict";
  var FINISHED = ["done", "failed"];
  var STATUS_TEXT = {uploading: "Uploading", queued: "Queued", running: "Running", done: "Done", failed: "Failed"};

  function setText(root, role, text) {
    var el = root.querySelector('[data-role="' + role + '"]');
    if (el && el.textContent !== text) { el.textContent = text; }
  }

  function update(root, body) {
    var c = body.counts, pct = Math.round(body.progress * 1000) / 10, whole = Math.round(pct) + "%";
    var bar = root.querySelector('[data-role="bar"]');
    if (bar) { bar.value = pct; bar.textContent = whole; }
    setText(root, "percent", whole);
    setText(root, "total", String(c.total));
    setText(root, "scored", String(c.scored));
    setText(root, "failed", String(c.failed));
    setText(root, "text", (c.scored + c.failed) + " of " + c.total + " images finished (" + whole + "): " +
      c.scored + " scored, " + c.failed + " could not be scored.");
    var status = root.querySelector('[data-role="status"]');
    if (status && root.getAttribute("data-status") !== body.status) {
      var badge = document.createElement("span");
      badge.className = "badge badge-" + body.status;
      badge.textContent = STATUS_TEXT[body.status] || body.status;
      status.replaceChildren(badge);
    }
    root.setAttribute("data-status", body.status);
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
