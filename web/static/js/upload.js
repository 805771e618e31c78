/* The new-job form: pick or drag-and-drop many images or zips, check type and size before sending, upload with
   a progress bar (XHR upload events), then open the job; files refused here or by the server are listed, and the
   accepted ones are uploaded anyway. Without JavaScript the form posts normally. */
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form || !window.FormData || !window.XMLHttpRequest) { return; }
  var input = document.getElementById("files");
  var labels = document.getElementById("labels");
  var zone = document.getElementById("dropzone");
  var summary = document.getElementById("file-summary");
  var button = document.getElementById("upload-button");
  var clearButton = document.getElementById("clear-button");
  var progressBox = document.getElementById("upload-progress");
  var bar = document.getElementById("upload-bar");
  var progressText = document.getElementById("upload-text");
  var result = document.getElementById("upload-result");
  var errorBox = document.getElementById("upload-error");
  var maxFile = Number(form.getAttribute("data-max-file"));
  var maxUpload = Number(form.getAttribute("data-max-upload"));
  var maxFiles = Number(form.getAttribute("data-max-files"));
  var IMAGE_TYPES = ["jpg", "jpeg", "png", "bmp", "tif", "tiff"];
  var accepted = [], refused = [];

  input.removeAttribute("required");  // dropped files do not pass through the input

  // A sent batch leaves nothing behind: the next one starts with no files, no name and no labels file, also when
  // the browser brings this page back from its history (Back) with the old values.
  function clearForm() {
    accepted = []; refused = []; input.value = ""; labels.value = "";
    if (form.elements.name) { form.elements.name.value = ""; }
  }
  window.addEventListener("pageshow", function (e) { if (e.persisted) { clearForm(); render(); } });

  function extension(name) { var i = name.lastIndexOf("."); return i < 0 ? "" : name.slice(i + 1).toLowerCase(); }
  function size(bytes) {
    if (bytes >= 1073741824) { return (bytes / 1073741824).toFixed(2) + " GB"; }
    if (bytes >= 1048576) { return (bytes / 1048576).toFixed(1) + " MB"; }
    return Math.max(1, Math.round(bytes / 1024)) + " KB";
  }
  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text) { node.textContent = text; }
    if (className) { node.className = className; }
    return node;
  }
  function problem(file) {
    var ext = extension(file.name);
    if (ext === "zip") { return file.size > maxUpload ? "larger than the upload limit of " + size(maxUpload) : null; }
    if (IMAGE_TYPES.indexOf(ext) < 0) { return "not a supported file type (use JPEG, PNG, BMP, TIFF, or a zip of them)"; }
    if (file.size === 0) { return "empty file"; }
    if (file.size > maxFile) { return "too large (" + size(file.size) + "; the limit is " + size(maxFile) + " per image)"; }
    return null;
  }
  function key(file) { return file.name + "|" + file.size + "|" + file.lastModified; }

  function add(files) {
    var seen = {};
    accepted.forEach(function (f) { seen[key(f)] = true; });
    Array.prototype.forEach.call(files, function (file) {
      if (seen[key(file)]) { return; }
      seen[key(file)] = true;
      var reason = problem(file);
      if (reason) { refused.push({filename: file.name, error: reason}); } else { accepted.push(file); }
    });
    while (accepted.length > maxFiles) {
      refused.push({filename: accepted.pop().name, error: "over the limit of " + maxFiles + " files per upload"});
    }
    render();
  }

  function listProblems(items, limit) {
    var ul = el("ul", null, "problems");
    items.slice(0, limit).forEach(function (item) {
      var li = el("li");
      li.appendChild(el("span", item.filename || ("line " + item.line), "mono"));
      li.appendChild(document.createTextNode(": " + item.error));
      ul.appendChild(li);
    });
    if (items.length > limit) { ul.appendChild(el("li", "…and " + (items.length - limit) + " more")); }
    return ul;
  }

  function render() {
    summary.replaceChildren();
    var total = accepted.reduce(function (n, f) { return n + f.size; }, 0);
    if (accepted.length) {
      summary.appendChild(el("p", accepted.length + (accepted.length === 1 ? " file" : " files") +
        " ready to upload (" + size(total) + ")."));
    }
    if (total > maxUpload) {
      summary.appendChild(el("p", "Together these are over the upload limit of " + size(maxUpload) +
        "; split them into several jobs.", "alert alert-error"));
    }
    if (refused.length) {
      summary.appendChild(el("p", refused.length + (refused.length === 1 ? " file" : " files") +
        " will not be uploaded:", "error-text"));
      summary.appendChild(listProblems(refused, 200));
    }
    clearButton.hidden = !(accepted.length || refused.length);
  }

  function showError(message, details) {
    errorBox.replaceChildren();
    var box = el("div", null, "alert alert-error");
    var p = el("p");
    p.appendChild(el("strong", "The upload was refused: "));
    p.appendChild(document.createTextNode(message));
    box.appendChild(p);
    if (details && details.length) { box.appendChild(listProblems(details, 200)); }
    errorBox.appendChild(box);
    errorBox.scrollIntoView({block: "nearest"});
  }

  input.addEventListener("change", function () { add(input.files); });  // files already listed are not added twice
  clearButton.addEventListener("click", function () {
    accepted = []; refused = []; input.value = ""; render(); input.focus();
  });
  ["dragenter", "dragover"].forEach(function (type) {
    zone.addEventListener(type, function (e) { e.preventDefault(); zone.classList.add("dragover"); });
  });
  ["dragleave", "drop"].forEach(function (type) {
    zone.addEventListener(type, function () { zone.classList.remove("dragover"); });
  });
  zone.addEventListener("drop", function (e) { e.preventDefault(); if (e.dataTransfer) { add(e.dataTransfer.files); } });
  // A file dropped next to the box must not make the browser leave the page.
  document.addEventListener("dragover", function (e) { e.preventDefault(); });
  document.addEventListener("drop", function (e) { e.preventDefault(); });

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    errorBox.replaceChildren();
    result.replaceChildren();
    if (!accepted.length) { showError("choose at least one image or zip file to upload.", refused); return; }
    var token = form.elements.csrf_token.value;
    var data = new FormData();
    data.append("csrf_token", token);
    accepted.forEach(function (file) { data.append("files", file, file.name); });
    if (labels.files.length) { data.append("labels", labels.files[0], labels.files[0].name); }
    var jobName = form.elements.name;
    if (jobName && jobName.value.trim()) { data.append("name", jobName.value.trim()); }

    var xhr = new XMLHttpRequest(), lastAnnounced = -1;
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRFToken", token);
    xhr.upload.addEventListener("progress", function (ev) {
      if (!ev.lengthComputable) { return; }
      var pct = Math.floor(ev.loaded / ev.total * 100);
      bar.value = pct;
      bar.textContent = pct + "%";
      if (pct >= lastAnnounced + 10 || pct === 100) {  // announce in steps, not on every event
        lastAnnounced = pct;
        progressText.textContent = "Uploaded " + size(ev.loaded) + " of " + size(ev.total) + " (" + pct + "%).";
      }
    });
    xhr.upload.addEventListener("load", function () {
      bar.value = 100;
      progressText.textContent = "Upload complete. Checking and storing the images…";
    });
    xhr.addEventListener("load", function () {
      var body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = {error: "unexpected answer (HTTP " + xhr.status + ")"}; }
      if (xhr.status === 201) {
        var notTaken = refused.concat(body.rejected || []);
        var labelNote = body.labels && body.labels.unmatched_label_rows ? body.labels.labels_summary : "";
        if (!notTaken.length && !labelNote) { clearForm(); window.location.assign(body.job_url); return; }
        // One count everywhere: the job's images are the accepted ones; refused files are refusals, not images.
        var box = el("div", null, "alert alert-info");
        box.appendChild(el("p", "Job created: " + Number(body.accepted).toLocaleString("en-US") +
          (body.accepted === 1 ? " image" : " images") +
          " accepted and queued for scoring."));
        if (labelNote) { box.appendChild(el("p", "Labels: " + labelNote)); }
        result.appendChild(box);
        if (notTaken.length) {
          var refusedBox = el("div", null, "alert alert-error");
          refusedBox.appendChild(el("p", notTaken.length + (notTaken.length === 1 ? " file was" : " files were") +
            " refused and will not be scored:"));
          refusedBox.appendChild(listProblems(notTaken, 200));
          result.appendChild(refusedBox);
        }
        var link = el("a", "Open the job", "button primary");
        link.href = body.job_url;
        result.appendChild(link);
        progressBox.hidden = true;
        clearForm(); render();
        link.focus();
      } else {
        progressBox.hidden = true;
        showError(body.error || ("HTTP " + xhr.status), body.details);
      }
      button.disabled = false;
    });
    xhr.addEventListener("error", function () {
      progressBox.hidden = true;
      button.disabled = false;
      showError("the connection failed during the upload. Check the network and try again.", []);
    });
    button.disabled = true;
    bar.value = 0;
    progressText.textContent = "Starting the upload…";
    progressBox.hidden = false;
    xhr.send(data);
  });
})();
