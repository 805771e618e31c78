/* The image page's review shortcuts: j next image, k previous image (the job's risk order), r review this one.
   Keys are ignored while typing in a form field or with a modifier held, so notes can contain j, k and r. */
(function () {
  "use strict";
  var nav = document.getElementById("review-nav");
  var form = document.getElementById("review-form");
  if (!nav && !form) { return; }

  function typing(target) {
    if (!target || !target.tagName) { return false; }
    var tag = target.tagName.toLowerCase();
    if (tag === "textarea" || tag === "select" || target.isContentEditable) { return true; }
    if (tag !== "input") { return false; }
    var type = (target.getAttribute("type") || "text").toLowerCase();
    return ["radio", "checkbox", "button", "submit", "reset"].indexOf(type) < 0;
  }

  function go(attribute) {
    var url = nav && nav.getAttribute(attribute);
    if (url) { window.location.assign(url); }
  }

  function review() {
    if (!form) { return; }
    var first = form.querySelector("input[name=decision]:checked") || form.querySelector("input[name=decision]");
    form.scrollIntoView({block: "center"});
    if (first) { first.focus(); }
  }

  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    if (event.key === "j") { event.preventDefault(); go("data-next-url"); }
    else if (event.key === "k") { event.preventDefault(); go("data-prev-url"); }
    else if (event.key === "r") { event.preventDefault(); review(); }
  });
}());
