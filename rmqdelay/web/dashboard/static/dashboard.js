// rmqdelay dashboard: progressive enhancement only. Every page works without this file;
// with it, the overview refreshes itself and destructive buttons ask first.
"use strict";

(function () {
  const REFRESH_MS = 2000;

  function refresh(box) {
    const url = box.getAttribute("data-live");
    let busy = false;
    setInterval(async function () {
      if (busy || document.hidden) {
        return;
      }
      busy = true;
      try {
        const response = await fetch(url, {
          credentials: "same-origin",
          headers: { Accept: "text/html" },
          redirect: "error",
        });
        if (response.ok) {
          // Rendered and escaped by the server, like the page it replaces.
          box.innerHTML = await response.text();
          box.removeAttribute("data-stale");
        } else {
          box.setAttribute("data-stale", String(response.status));
        }
      } catch (error) {
        box.setAttribute("data-stale", "offline");
      } finally {
        busy = false;
      }
    }, REFRESH_MS);
  }

  function confirmFirst(form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) {
        event.preventDefault();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(refresh);
    document.querySelectorAll("form[data-confirm]").forEach(confirmFirst);
  });
})();
