// speedy master console: refresh the page's cells in place from /ui/state.json.
// Text goes in with textContent only; a change of groups or servers reloads the page.
(function () {
  "use strict";
  var root = document.getElementById("console");
  if (!root || !window.fetch) { return; }
  var url = root.getAttribute("data-state");
  var layout = root.getAttribute("data-layout");
  var every = 1000 * (parseFloat(root.getAttribute("data-refresh")) || 2);
  var live = document.getElementById("live");

  function say(text, bad) {
    if (live) { live.textContent = text; live.className = bad ? "why" : "muted"; }
  }

  function apply(state) {
    if (state.layout !== layout) { window.location.reload(); return; }
    Object.keys(state.cells).forEach(function (id) {
      var el = document.getElementById(id);
      if (!el) { return; }
      var cell = state.cells[id];
      if (el.textContent !== cell[0]) { el.textContent = cell[0]; }
      if (cell[1] && el.className !== cell[1]) { el.className = cell[1]; }
    });
    Object.keys(state.bars).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) { el.value = state.bars[id] === null ? 0 : state.bars[id]; }
    });
    say("(live, every " + every / 1000 + " s)", false);
  }

  function tick() {
    fetch(url, {cache: "no-store", credentials: "same-origin"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(apply)
      .catch(function (e) { say("(master unreachable: " + e.message + "; retrying)", true); })
      .then(function () { window.setTimeout(tick, every); });
  }
  say("(live, every " + every / 1000 + " s)", false);
  window.setTimeout(tick, every);
}());
