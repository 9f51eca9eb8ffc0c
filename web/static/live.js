// The live view: its rows fetched again every two seconds (the Stop buttons are plain forms).
(function () {
  var rows = document.getElementById("live-rows");
  if (!rows) return;
  function refresh() {
    fetch("/admin/live?fragment=1", { credentials: "same-origin", cache: "no-store" })
      .then(function (reply) {
        if (reply.redirected) { window.location.reload(); return null; }  // signed out meanwhile
        return reply.ok ? reply.text() : null;
      })
      .then(function (html) { if (html !== null) rows.innerHTML = html; })
      .catch(function () {});
  }
  setInterval(refresh, 2000);
})();
