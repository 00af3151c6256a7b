// speedy gateway console: drag-and-drop uploads (key and URL shown as they come back)
// and a confirmation before a delete. Without JavaScript both work as plain forms.
(function () {
  "use strict";
  var form = document.getElementById("upload");
  var results = document.getElementById("results");

  function item(parts) {
    var li = document.createElement("li");
    parts.forEach(function (p) {
      var el;
      if (p.href) {
        el = document.createElement("a");
        el.href = p.href;
      } else {
        el = document.createElement(p.code ? "code" : "span");
      }
      if (p.cls) { el.className = p.cls; }
      el.textContent = p.text;
      li.appendChild(el);
      li.appendChild(document.createTextNode(" "));
    });
    results.appendChild(li);
    return li;
  }

  function send(file, dir) {
    var path = dir + file.name;
    var li = item([{text: path}, {text: "uploading\u2026", cls: "muted"}]);
    return fetch("/ui/upload?path=" + encodeURIComponent(path), {
      method: "POST", body: file, credentials: "same-origin",
      headers: {"Accept": "application/json"}
    }).then(function (r) {
      if (!r.ok) {
        return r.text().then(function (t) { throw new Error("HTTP " + r.status + ": " + t); });
      }
      return r.json();
    }).then(function (res) {
      results.removeChild(li);
      item([{text: res.path, href: res.page, cls: "name"}, {text: "key"},
            {text: res.key, code: true, cls: "key"}, {text: res.url, href: res.url, cls: "url"}]);
    }).catch(function (e) {
      results.removeChild(li);
      item([{text: path}, {text: e.message, cls: "why"}]);
    });
  }

  function sendAll(files) {
    var dir = form.getAttribute("data-dir") || "";
    var chain = Promise.resolve();
    Array.prototype.forEach.call(files, function (f) {
      chain = chain.then(function () { return send(f, dir); });
    });
    return chain.then(function () {
      if (!document.getElementById("relist")) {
        var a = item([{text: "show the listing again", href: window.location.href}]);
        a.id = "relist";
      }
    });
  }

  if (form && window.fetch) {
    var input = document.getElementById("file");
    input.multiple = true;
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (input.files.length) { sendAll(input.files).then(function () { input.value = ""; }); }
    });
    ["dragenter", "dragover"].forEach(function (name) {
      form.addEventListener(name, function (ev) { ev.preventDefault(); form.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      form.addEventListener(name, function () { form.classList.remove("over"); });
    });
    form.addEventListener("drop", function (ev) {
      ev.preventDefault();
      if (ev.dataTransfer && ev.dataTransfer.files.length) { sendAll(ev.dataTransfer.files); }
    });
  }

  var del = document.getElementById("delete");
  if (del) {
    del.addEventListener("submit", function (ev) {
      var confirmField = del.querySelector("input[name=confirm]");
      if (confirmField.value === "yes") { return; }
      if (window.confirm("Delete " + del.getAttribute("data-path") + "? This cannot be undone.")) {
        confirmField.value = "yes";
      } else {
        ev.preventDefault();
      }
    });
  }
}());
