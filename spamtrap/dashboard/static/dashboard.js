// spamtrap dashboard: polls data.json and fills the page. Everything the
// server sends is set through textContent or DOM attributes, never parsed
// as HTML: HELO names and campaign ids are whatever the sender made them.
(function () {
  "use strict";
  var POLL_MS = 2000;
  var SVG = "http://www.w3.org/2000/svg";
  var token = takeToken();

  // ?token=<t>: kept in this tab's sessionStorage and removed from the
  // address bar (and so from the history), sent as a Bearer header.
  function takeToken() {
    var params = new URLSearchParams(window.location.search);
    var t = params.get("token");
    try {
      if (t) {
        window.sessionStorage.setItem("spamtrap-dashboard-token", t);
        params.delete("token");
        var rest = params.toString();
        window.history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : ""));
      } else {
        t = window.sessionStorage.getItem("spamtrap-dashboard-token");
      }
    } catch (e) {
      // No storage (a locked-down browser): the token still works until reload.
    }
    return t;
  }

  function dataURL() {
    var path = window.location.pathname;
    return (path.charAt(path.length - 1) === "/" ? path : path + "/") + "data.json";
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var name in attrs) {
      if (Object.prototype.hasOwnProperty.call(attrs, name)) node.setAttribute(name, String(attrs[name]));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    return typeof value === "number" ? value.toLocaleString("en-US") : String(value);
  }

  // A number cell: data-metric (and any labels as data-*), data-value the exact figure.
  function num(tag, metric, value, labels) {
    var attrs = { "data-metric": metric, "data-value": value, "class": "n" };
    for (var k in labels) {
      if (Object.prototype.hasOwnProperty.call(labels, k)) attrs["data-" + k] = labels[k];
    }
    return el(tag, attrs, fmt(value));
  }

  function setFigure(metric, value) {
    var nodes = document.querySelectorAll('main [data-metric="' + metric + '"], header [data-metric="' + metric + '"]');
    for (var i = 0; i < nodes.length; i++) {
      if (nodes[i].tagName.toLowerCase() === "svg" || nodes[i].tagName.toLowerCase() === "ol") continue;
      nodes[i].textContent = fmt(value);
      nodes[i].setAttribute("data-value", value === null ? "" : String(value));
    }
  }

  function fill(id, rows, empty, columns) {
    var body = document.getElementById(id);
    body.replaceChildren();
    if (!rows.length) {
      body.appendChild(el("tr", {}, null)).appendChild(el("td", { "class": "empty", colspan: columns }, empty));
      return;
    }
    rows.forEach(function (row) { body.appendChild(row); });
  }

  function safeLink(url) {
    // Only http(s) links: never a javascript: or data: URL.
    return /^https?:\/\//i.test(url) ? url : null;
  }

  function setRow(set, isPrivate) {
    var name = isPrivate ? "private sets (" + set.sets + ")" : set.name;
    var labels = isPrivate ? { set: "(private)" } : { set: set.name };
    var tr = el("tr", { "data-set": labels.set });
    tr.appendChild(el("td", {}, name));
    ["messages", "duplicates", "sampled_out", "bundles_open", "bundles_stored", "bundles_waiting", "bundles_skipped"].forEach(function (k) {
      tr.appendChild(num("td", "set_" + k, set[k], labels));
    });
    var cell = el("td", { "class": "bundles", "data-metric": "set_last_bundles" });
    if (isPrivate) {
      cell.textContent = "counts only";
    } else if (!set.last.length) {
      cell.textContent = "none since start";
    } else {
      set.last.forEach(function (b) {
        var href = b.url && safeLink(b.url);
        var text = b.key.split("/").pop() + " (" + fmt(b.messages) + ")";
        var link = href ? el("a", { href: href, rel: "noopener noreferrer", "data-key": b.key }, text) : el("span", { "data-key": b.key }, text);
        cell.appendChild(link);
      });
    }
    tr.appendChild(cell);
    return tr;
  }

  function sparkline(values) {
    var svg = document.getElementById("sparkline");
    svg.replaceChildren();
    var max = Math.max.apply(null, values.concat([1]));
    var w = 600 / values.length;
    values.forEach(function (v, i) {
      var h = v ? Math.max(1, 58 * v / max) : 0;
      var rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(i * w + 0.5));
      rect.setAttribute("width", String(Math.max(w - 1, 1)));
      rect.setAttribute("y", String(60 - h));
      rect.setAttribute("height", String(h));
      rect.setAttribute("data-value", String(v));
      var title = document.createElementNS(SVG, "title");
      title.textContent = (values.length - 1 - i) + " min ago: " + v;
      rect.appendChild(title);
      svg.appendChild(rect);
    });
    svg.setAttribute("data-value", values.join(","));
  }

  function top(dimension, entries) {
    var list = document.getElementById("top-" + dimension);
    list.replaceChildren();
    entries.forEach(function (entry) {
      var li = el("li", {});
      li.appendChild(el("span", { "class": "key" }, entry[0]));
      li.appendChild(num("span", "top_" + dimension, entry[1], { key: entry[0] }));
      list.appendChild(li);
    });
  }

  // One row per output, one column per figure any output has (sent,
  // failed, queue_depth...): whatever spamtrap_output_* metrics exist.
  function outputs(rows) {
    var columns = [];
    rows.forEach(function (o) {
      Object.keys(o.figures).forEach(function (k) { if (columns.indexOf(k) < 0) columns.push(k); });
    });
    columns.sort();
    var head = document.getElementById("outputs-head");
    head.replaceChildren(el("th", {}, "output"));
    columns.forEach(function (k) { head.appendChild(el("th", {}, k.replace(/_/g, " "))); });
    fill("outputs", rows.map(function (o) {
      var tr = el("tr", { "data-output": o.output });
      tr.appendChild(el("td", {}, o.output));
      columns.forEach(function (k) {
        tr.appendChild(num("td", "output_" + k, o.figures[k] === undefined ? 0 : o.figures[k], { output: o.output }));
      });
      return tr;
    }), "no outputs configured", columns.length + 1);
  }

  function render(doc) {
    var f = doc.figures;
    document.getElementById("node").textContent = doc.node;
    document.getElementById("role").textContent = doc.role;
    document.getElementById("queue-card").hidden = f.queue_length === null;
    Object.keys(f).forEach(function (k) { setFigure(k, f[k]); });
    var perMinute = doc.intake_per_minute;
    setFigure("intake_last_minute", perMinute[perMinute.length - 1]);
    sparkline(perMinute);
    var sets = doc.sets.map(function (s) { return setRow(s, false); });
    if (doc.private_sets) sets.push(setRow(doc.private_sets, true));
    fill("sets", sets, "no sets", 9);
    fill("verdicts", doc.verdicts.map(function (v) {
      var tr = el("tr", {});
      tr.appendChild(el("td", {}, v.stage));
      tr.appendChild(el("td", {}, v.verdict));
      tr.appendChild(num("td", "filter_verdicts", v.count, { stage: v.stage, verdict: v.verdict }));
      return tr;
    }), "no verdicts yet", 3);
    fill("notices", doc.notices.map(function (n) {
      var tr = el("tr", {});
      tr.appendChild(el("td", {}, n.channel));
      tr.appendChild(el("td", {}, n.outcome));
      tr.appendChild(num("td", "notifications", n.count, { channel: n.channel, outcome: n.outcome }));
      return tr;
    }), "no notices yet", 3);
    outputs(doc.outputs);
    Object.keys(doc.top).forEach(function (d) { top(d, doc.top[d]); });
    var status = document.getElementById("status");
    status.textContent = "live";
    status.setAttribute("data-value", "live");
    status.className = "status";
    document.getElementById("generated").textContent = doc.generated;
  }

  function failed(why) {
    var status = document.getElementById("status");
    status.textContent = "not updating: " + why;
    status.setAttribute("data-value", "stale");
    status.className = "status stale";
  }

  function poll() {
    var headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    fetch(dataURL(), { headers: headers, cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) throw new Error("a token is needed: open dashboard?token=<token>");
        if (r.status === 403) throw new Error("the dashboard has no token configured");
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(render)
      .catch(function (e) { failed(e.message || String(e)); })
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }

  poll();
}());
