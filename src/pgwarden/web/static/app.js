// Times: shown in the browser's time zone (the UTC value stays in the title), and the
// offset sent with any form that carries a local date-time. Text only, never HTML.
(function () {
  "use strict";
  function localize(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) { el.textContent = d.toLocaleString(); }
    });
  }
  function offsets(root) {
    var minutes = String(-new Date().getTimezoneOffset());
    root.querySelectorAll("input[type=hidden][name=tz]").forEach(function (el) {
      el.value = minutes;
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    localize(document); offsets(document);
  });
  document.addEventListener("htmx:afterSwap", function (ev) { localize(ev.target.parentNode || document); });
})();
