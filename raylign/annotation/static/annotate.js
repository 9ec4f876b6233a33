/* raylign annotate: keyboard shortcuts and a progress refresh. The pages work without this script.
   Keys on an item page: 1 = A is better, 2 = B is better, 3 = about the same, 0 = cannot judge
   (rating items: 0). Keys are ignored while typing in a text field. */
(function () {
  "use strict";

  function typing(target) {
    if (!target) return false;
    var tag = target.tagName;
    return tag === "TEXTAREA" || tag === "SELECT" || target.isContentEditable ||
      (tag === "INPUT" && ["text", "search", "email", "number", "url"].indexOf(target.type) >= 0);
  }

  var form = document.getElementById("judge-form");
  if (form) {
    var sent = false;
    form.addEventListener("submit", function () { sent = true; });
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
      var button = form.querySelector('button[data-key="' + event.key + '"]');
      if (!button) return;
      event.preventDefault();
      if (sent) return; // one answer per page; the server also drops a repeated form
      if (typeof form.requestSubmit === "function") {
        form.requestSubmit(button);
      } else {
        button.click();
      }
    });
  }

  var box = document.getElementById("progress");
  if (box && window.fetch) {
    var bar = document.getElementById("progress-bar");
    var text = document.getElementById("progress-text");
    var refresh = function () {
      fetch("/api/progress", { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (p) {
          if (!p) return;
          bar.max = Math.max(p.total, 1);
          bar.value = p.done;
          text.textContent = p.done + " / " + p.total + " done";
          box.dataset.done = p.done;
          box.dataset.total = p.total;
        })
        .catch(function () { /* offline for a moment: keep what is shown */ });
    };
    document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
    window.setInterval(refresh, 30000);
  }
})();
