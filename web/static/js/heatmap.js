/* The image page's Grad-CAM heatmap: ask for it (a worker computes it on demand), poll until it is cached, show it. */
(function () {
  "use strict";
  var figure = document.getElementById("heatmap-figure");
  if (!figure) { return; }
  var state = figure.getAttribute("data-state");
  if (state === "ready" || state === "error") { return; }
  var img = document.getElementById("heatmap-image");
  var status = document.getElementById("heatmap-status");
  var url = figure.getAttribute("data-state-url");
  var delay = 1000, tries = 0;

  function show(src) {
    img.addEventListener("load", function () { img.hidden = false; status.hidden = true; figure.setAttribute("data-state", "ready"); });
    img.addEventListener("error", function () { status.textContent = "The heatmap could not be loaded. Reload the page to try again."; });
    img.src = src;
  }

  function tick() {
    fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (body) {
        if (body.state === "ready") { show(body.url); return; }
        if (body.state === "error" || body.state === "unavailable") {
          status.textContent = "The heatmap could not be computed: " + (body.error || "unknown reason");
          figure.setAttribute("data-state", "error");
          return;
        }
        tries += 1;
        if (tries === 8) { status.textContent = "Still computing the heatmap; the workers may be busy scoring a batch…"; }
        delay = Math.min(delay * 1.3, 8000);
        window.setTimeout(tick, delay);
      })
      .catch(function () { delay = Math.min(delay * 2, 30000); window.setTimeout(tick, delay); });
  }
  window.setTimeout(tick, 600);
})();
