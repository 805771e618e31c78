/* The image page's Grad-CAM heatmap. A grid kept with the prediction (bundles whose ONNX model outputs its feature
   map) is drawn here on the image, over the part the network sees: the whole image ("squash" bundles) or the
   centre square (crop bundles, outlined). Otherwise a worker computes a PNG on demand: poll until it is cached. */
(function () {
  "use strict";
  var figure = document.getElementById("heatmap-figure");
  if (!figure) { return; }
  var state = figure.getAttribute("data-state");
  var status = document.getElementById("heatmap-status");

  /* OpenCV's COLORMAP_JET, as pytorch-grad-cam's show_cam_on_image uses it (0 blue .. 1 red). */
  function jet(v) {
    function c(x) { return Math.max(0, Math.min(1, x)); }
    return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
  }

  /* Bilinear value of the grid at a point of the region, with OpenCV's resize geometry (half-pixel centres). */
  function sample(grid, rows, cols, fx, fy) {
    var gx = Math.max(0, Math.min(cols - 1, fx * cols - 0.5)), gy = Math.max(0, Math.min(rows - 1, fy * rows - 0.5));
    var x0 = Math.floor(gx), y0 = Math.floor(gy), x1 = Math.min(cols - 1, x0 + 1), y1 = Math.min(rows - 1, y0 + 1);
    var ax = gx - x0, ay = gy - y0;
    var top = grid[y0][x0] * (1 - ax) + grid[y0][x1] * ax, bottom = grid[y1][x0] * (1 - ax) + grid[y1][x1] * ax;
    return top * (1 - ay) + bottom * ay;
  }

  function draw() {
    var grid = JSON.parse(figure.getAttribute("data-grid"));
    var crop = parseFloat(figure.getAttribute("data-crop")) || 1;
    var squash = figure.getAttribute("data-mode") === "squash";
    var canvas = document.getElementById("heatmap-canvas");
    var picture = new Image();
    picture.addEventListener("error", function () {
      status.textContent = "The image could not be loaded. Reload the page to try again.";
      figure.setAttribute("data-state", "error");
    });
    picture.addEventListener("load", function () {
      var w = picture.naturalWidth, h = picture.naturalHeight, scale = Math.min(1, 768 / Math.max(w, h));
      var cw = Math.max(1, Math.round(w * scale)), ch = Math.max(1, Math.round(h * scale));
      canvas.width = cw;
      canvas.height = ch;
      var ctx = canvas.getContext("2d");
      ctx.drawImage(picture, 0, 0, cw, ch);
      // The network's input in the image (worker/gradcam.py's display_crop): all of it, or the centre square.
      var side = Math.min(w, h) * crop;
      var region = squash ? [0, 0, w, h] : [(w - side) / 2, (h - side) / 2, side, side];
      var rx = Math.round(region[0] * scale), ry = Math.round(region[1] * scale);
      var rw = Math.max(1, Math.round(region[2] * scale)), rh = Math.max(1, Math.round(region[3] * scale));
      var rows = grid.length, cols = grid[0].length;
      var pixels = ctx.getImageData(rx, ry, rw, rh), d = pixels.data;
      for (var y = 0; y < rh; y++) {
        for (var x = 0; x < rw; x++) {
          var rgb = jet(sample(grid, rows, cols, (x + 0.5) / rw, (y + 0.5) / rh)), i = (y * rw + x) * 4;
          d[i] = 0.6 * d[i] + 0.4 * 255 * rgb[0];
          d[i + 1] = 0.6 * d[i + 1] + 0.4 * 255 * rgb[1];
          d[i + 2] = 0.6 * d[i + 2] + 0.4 * 255 * rgb[2];
        }
      }
      ctx.putImageData(pixels, rx, ry);
      if (!squash) {  // mark the crop: the map says nothing about the rest of the image
        ctx.lineWidth = Math.max(2, Math.round(cw / 200));
        ctx.strokeStyle = "#ffffff";
        ctx.setLineDash([8, 6]);
        ctx.strokeRect(rx + 1, ry + 1, rw - 2, rh - 2);
      }
      canvas.setAttribute("data-region", region.map(function (v) { return v.toFixed(1); }).join(","));
      canvas.hidden = false;
      status.hidden = true;
      figure.setAttribute("data-state", "ready");
    });
    picture.src = figure.getAttribute("data-src");
  }

  if (state === "drawing") { draw(); return; }
  if (state === "ready" || state === "error") { return; }
  var img = document.getElementById("heatmap-image");
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
