// Refresh every element with data-live-src from its HTML fragment every few seconds.
(function () {
  "use strict";
  var nodes = document.querySelectorAll("[data-live-src]");
  var every = parseInt(document.body.getAttribute("data-refresh-ms") || "3000", 10);
  function refresh() {
    if (document.hidden) return;
    nodes.forEach(function (node) {
      fetch(node.getAttribute("data-live-src"), { cache: "no-store", credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
        .then(function (html) { node.innerHTML = html; node.removeAttribute("data-stale"); })
        .catch(function () { node.setAttribute("data-stale", "true"); });
    });
  }
  if (nodes.length) setInterval(refresh, every);
})();
