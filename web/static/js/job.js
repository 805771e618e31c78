/* The job page's results filters apply as soon as one changes (the Apply button stays for pages without
   JavaScript); no inline script, as the Content Security Policy requires. */
(function () {
  "use strict";
  var form = document.querySelector('form[data-autosubmit="true"]');
  if (!form) { return; }
  var apply = form.querySelector('[data-role="apply"]');
  if (apply) { apply.hidden = true; }
  form.querySelectorAll("select").forEach(function (select) {
    select.addEventListener("change", function () {
      var page = form.querySelector('input[name="page"]');
      if (page) { page.value = "1"; }
      if (form.requestSubmit) { form.requestSubmit(); } else { form.submit(); }
    });
  });
})();
