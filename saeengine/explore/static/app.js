/* saeengine explorer: a small single-page app over the /api/* JSON (docs/explore.md).
 *
 * Plain ES2017, no build step, no external resources. Hash routes:
 *   #/latents?sort=frequency&order=desc&filter=alive&q=&page=0   the latent table + scatter
 *   #/latent/<j>                                                 one latent's page
 *   #/image/<image>                                              patches, top latents, sliders
 *   #/compare?image=<image>&other=<name>                         two SAEs side by side
 * Static mode (window.SAE_STATIC === true, written by `saeengine explore DIR --export OUT`)
 * reads api/<path>.json files (or their api/<path>.js twins when opened from file://, where
 * Chromium refuses fetch) and hides the pages that need a live server.
 * Testing hooks live on window.SAE_TEST (scatter point positions, the last requests).
 */
(function () {
  "use strict";

  var STATIC = window.SAE_STATIC === true;
  var FILE = location.protocol === "file:";
  var PAGE_SIZES = [25, 50, 100, 200];
  var SCALE_MIN = -2, SCALE_MAX = 10, SCALE_STEP = 0.1;
  var DEBOUNCE_MS = 120;

  var view = document.getElementById("view");
  var state = { info: null, scatter: null, allRows: null, image: null };
  var TEST = (window.SAE_TEST = { scatter: null, lastPatches: null, lastIntervene: null, route: null });

  // ----- small DOM helpers ----------------------------------------------------------------
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") node.textContent = v;
        else if (k === "class") node.className = v;
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : String(v));
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function fmt(v) {
    if (v === null || v === undefined) return "n/a";
    if (typeof v !== "number") return String(v);
    if (!isFinite(v)) return String(v);
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a < 1e-3 || a >= 1e5) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }
  function pct(p) { return (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%"; }
  function showError(msg) {
    var box = document.getElementById("error");
    box.textContent = msg;
    box.hidden = !msg;
  }
  var busyCount = 0;
  function busy(delta) {
    busyCount = Math.max(0, busyCount + delta);
    document.getElementById("busy").hidden = busyCount === 0;
  }
  function debounce(fn, ms) {
    var t = null;
    return function () {
      var args = arguments;
      if (t) clearTimeout(t);
      t = setTimeout(function () { t = null; fn.apply(null, args); }, ms);
    };
  }

  // ----- data access ------------------------------------------------------------------------
  // Live: the JSON API. Errors carry the server's {"detail"} message (it names the fix).
  function request(method, path, body, isForm) {
    var opts = { method: method, headers: {} };
    if (body !== undefined) {
      if (isForm) opts.body = body;
      else { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
    }
    busy(1);
    return fetch("api/" + path, opts).then(function (r) {
      return r.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (!r.ok) {
          var detail = data && data.detail ? data.detail : text || r.statusText;
          if (typeof detail !== "string") detail = JSON.stringify(detail);
          throw new Error(method + " /api/" + path + ": HTTP " + r.status + ": " + detail);
        }
        return data;
      });
    }).finally(function () { busy(-1); });
  }

  // Static: api/<path>.json over http(s); the api/<path>.js twin (a script that stores the
  // object in window.SAE_DATA[path]) from file://, where fetch of file URLs is refused.
  var staticCache = {};
  function staticGet(path) {
    if (staticCache[path]) return staticCache[path];
    var p;
    if (FILE) {
      p = new Promise(function (resolve, reject) {
        var store = (window.SAE_DATA = window.SAE_DATA || {});
        if (path in store) { resolve(store[path]); return; }
        var s = document.createElement("script");
        s.src = "api/" + path + ".js";
        s.onload = function () {
          if (path in store) resolve(store[path]);
          else reject(new Error("api/" + path + ".js did not define SAE_DATA[\"" + path + "\"]: re-run the export"));
        };
        s.onerror = function () {
          reject(new Error("api/" + path + ".js is missing from this export (re-run `saeengine explore DIR --export OUT`)"));
        };
        document.head.appendChild(s);
      });
    } else {
      busy(1);
      p = fetch("api/" + path + ".json").then(function (r) {
        if (!r.ok) throw new Error("api/" + path + ".json: HTTP " + r.status + " (not part of this export)");
        return r.json();
      }).finally(function () { busy(-1); });
    }
    staticCache[path] = p;
    p.catch(function () { delete staticCache[path]; });
    return p;
  }

  function getJSON(path, params) {
    if (STATIC) return staticGet(path);
    var qs = params ? "?" + new URLSearchParams(params).toString() : "";
    return request("GET", path + qs);
  }

  // Thumb URLs come from the API as "/api/thumb/<image>?latent=<j>"; the export stores them as
  // api/thumb/<image>-<j>.png (and the plain image as api/thumb/<image>.png).
  function thumbUrl(url) {
    if (!url) return "";
    if (!STATIC || /\.png$/.test(url)) return url;   // the export writes relative .png paths already
    var m = /^\/?api\/thumb\/([^?#]+)(?:\?latent=(-?\d+))?$/.exec(url);
    if (!m) return url.replace(/^\//, "");
    return "api/thumb/" + m[1] + (m[2] !== undefined ? "-" + m[2] : "") + ".png";
  }

  function info() {
    if (!state.info) state.info = getJSON("info");
    return state.info;
  }

  // Latent rows: the API pages and sorts; a static export holds every row in api/latents.json,
  // so the same query runs here (same definitions as the server: see denseThreshold).
  function denseThreshold(inf) {
    // saeengine.eval.latent_stats.DENSE_FREQUENCY (1%) unless the server says otherwise.
    return inf && typeof inf.dense_threshold === "number" ? inf.dense_threshold : 0.01;
  }
  function queryLatents(q) {
    if (!STATIC) {
      var params = { offset: q.offset, limit: q.limit, sort: q.sort, order: q.order, filter: q.filter };
      if (q.q !== "") params.q = q.q;
      return getJSON("latents", params);
    }
    return Promise.all([info(), staticGet("latents")]).then(function (res) {
      var dense = denseThreshold(res[0]);
      var rows = res[1].rows.filter(function (r) {
        if (q.filter === "dead") return r.frequency === 0;
        if (q.filter === "alive") return r.frequency > 0;
        if (q.filter === "dense") return r.frequency > dense;
        return true;
      });
      if (q.q !== "") rows = rows.filter(function (r) { return String(r.id) === String(q.q).trim(); });
      var key = q.sort, sign = q.order === "desc" ? -1 : 1;
      rows = rows.slice().sort(function (a, b) {
        var d = (a[key] - b[key]) * sign;
        return d !== 0 && !isNaN(d) ? d : a.id - b.id;
      });
      return { total: rows.length, rows: rows.slice(q.offset, q.offset + q.limit) };
    });
  }

  // ----- routing -----------------------------------------------------------------------------
  function parseHash() {
    var h = location.hash.replace(/^#\/?/, "");
    var qi = h.indexOf("?");
    var path = qi >= 0 ? h.slice(0, qi) : h;
    var params = new URLSearchParams(qi >= 0 ? h.slice(qi + 1) : "");
    var parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    return { page: parts[0] || "latents", arg: parts[1], params: params };
  }
  function go(hash) { if (location.hash !== hash) location.hash = hash; else render(); }

  var renderSeq = 0, lastPage = null;
  function render() {
    var route = parseHash();
    if (STATIC && (route.page === "image" || route.page === "compare")) route = { page: "latents", params: new URLSearchParams() };
    TEST.route = route.page;
    var seq = ++renderSeq;
    showError("");
    view.setAttribute("data-page", route.page);
    view.setAttribute("data-ready", "0");
    document.querySelectorAll("#nav a").forEach(function (a) {
      a.classList.toggle("active", a.getAttribute("data-page") === route.page);
    });
    clear(view);
    if (route.page !== lastPage || route.page !== "latents") window.scrollTo(0, 0);
    lastPage = route.page;
    var page = { latents: latentsPage, latent: latentPage, image: imagePage, compare: comparePage }[route.page];
    if (!page) { showError("unknown page #/" + route.page + ": use the links above"); return; }
    Promise.resolve(page(route, function () { return seq === renderSeq; })).then(function () {
      if (seq === renderSeq) view.setAttribute("data-ready", "1");
    }).catch(function (e) {
      if (seq === renderSeq) { showError(e.message); view.setAttribute("data-ready", "error"); }
    });
  }

  // ======================================================================================
  // Latents page: table + scatter
  // ======================================================================================
  function latentsPage(route, current) {
    var p = route.params;
    var q = {
      sort: ["id", "frequency", "mean", "max"].indexOf(p.get("sort")) >= 0 ? p.get("sort") : "id",
      order: p.get("order") === "desc" ? "desc" : "asc",
      filter: ["all", "alive", "dead", "dense"].indexOf(p.get("filter")) >= 0 ? p.get("filter") : "all",
      q: (p.get("q") || "").trim(),
      limit: PAGE_SIZES.indexOf(+p.get("limit")) >= 0 ? +p.get("limit") : 50,
      page: Math.max(0, parseInt(p.get("page") || "0", 10) || 0)
    };
    q.offset = q.page * q.limit;
    function link(changes) {
      var next = Object.assign({}, q, changes);
      var s = new URLSearchParams({ sort: next.sort, order: next.order, filter: next.filter, q: next.q,
                                    limit: next.limit, page: next.page });
      return "#/latents?" + s.toString();
    }

    var search = el("input", { id: "latent-search", type: "search", placeholder: "latent id", value: q.q,
                               inputmode: "numeric", "aria-label": "search by latent id" });
    var form = el("form", { id: "latent-search-form", onsubmit: function (e) {
      e.preventDefault();
      var v = search.value.trim();
      // A single id that exists opens its page directly; otherwise the table shows the match (or none).
      go(link({ q: v, page: 0 }));
    } }, [search, el("button", { type: "submit", text: "Search" })]);
    var filter = el("select", { id: "latent-filter", "aria-label": "filter", onchange: function () {
      go(link({ filter: filter.value, page: 0 }));
    } }, ["all", "alive", "dead", "dense"].map(function (f) {
      return el("option", { value: f, text: f, selected: f === q.filter });
    }));
    var sizeSel = el("select", { id: "page-size", "aria-label": "rows per page", onchange: function () {
      go(link({ limit: +sizeSel.value, page: 0 }));
    } }, PAGE_SIZES.map(function (n) { return el("option", { value: n, text: n + " / page", selected: n === q.limit }); }));

    var tableBox = el("div", { id: "latents-table-box" });
    var scatterBox = el("div", { id: "scatter-box" });
    view.appendChild(el("div", { class: "controls" }, [form, el("label", {}, ["filter ", filter]), sizeSel,
                                                       el("span", { id: "dense-note", class: "muted" })]));
    view.appendChild(el("div", { class: "two-col" }, [tableBox, scatterBox]));

    if (q.q !== "" && !/^\d+$/.test(q.q)) {   // the server would answer 400: say it here
      tableBox.appendChild(el("p", { id: "latents-empty", class: "muted", text: "search by latent id: \u201c" + q.q +
                                     "\u201d is not a non-negative integer" }));
    }
    var tableDone = (q.q !== "" && !/^\d+$/.test(q.q)) ? Promise.resolve() : queryLatents(q).then(function (res) {
      if (!current()) return;
      var cols = [["id", "id"], ["frequency", "frequency"], ["mean", "mean"], ["max", "max"], ["note", null]];
      var head = el("tr", {}, cols.map(function (c) {
        if (!c[1]) return el("th", { text: c[0] });
        var active = q.sort === c[1];
        var nextOrder = active && q.order === "asc" ? "desc" : (active ? "asc" : (c[1] === "id" ? "asc" : "desc"));
        return el("th", { "data-sort": c[1], class: active ? "sorted " + q.order : "" }, [
          el("a", { href: link({ sort: c[1], order: nextOrder, page: 0 }), text: c[0] + (active ? (q.order === "asc" ? " \u25B2" : " \u25BC") : "") })
        ]);
      }));
      var body = el("tbody", {}, res.rows.map(function (r) {
        return el("tr", { "data-latent-id": r.id, class: r.frequency === 0 ? "dead" : "" }, [
          el("td", { class: "num" }, [r.exported === false   // a static export without this latent's page
            ? el("span", { class: "no-page", title: "no page in this export", text: String(r.id) })
            : el("a", { href: "#/latent/" + r.id, text: String(r.id) })]),
          el("td", { class: "num", text: fmt(r.frequency) }),
          el("td", { class: "num", text: fmt(r.mean) }),
          el("td", { class: "num", text: fmt(r.max) }),
          el("td", { class: "note-cell", text: r.note || "" })
        ]);
      }));
      var pages = Math.max(1, Math.ceil(res.total / q.limit));
      var pager = el("div", { class: "pager" }, [
        el("a", { id: "prev-page", href: q.page > 0 ? link({ page: q.page - 1 }) : null, class: q.page > 0 ? "" : "disabled", text: "\u2190 prev" }),
        el("span", { id: "page-info", "data-total": res.total,
                     text: " page " + (q.page + 1) + " of " + pages + " (" + res.total + " latents) " }),
        el("a", { id: "next-page", href: q.page + 1 < pages ? link({ page: q.page + 1 }) : null, class: q.page + 1 < pages ? "" : "disabled", text: "next \u2192" })
      ]);
      clear(tableBox).appendChild(el("table", { id: "latents-table" }, [el("thead", {}, [head]), body]));
      tableBox.appendChild(pager);
      if (!res.rows.length) {
        var empty = el("p", { id: "latents-empty", class: "muted", text: "no latents match this filter" });
        tableBox.appendChild(empty);
        if (q.q) info().then(function (inf) {
          empty.textContent = "no latent with id " + q.q + " under filter " + q.filter + " (ids are 0.." + (inf.d_sae - 1) + ")";
        }, function () { /* shown by the page's own error */ });
      }
    });
    info().then(function (inf) {
      if (current()) document.getElementById("dense-note").textContent = "dense: frequency > " + fmt(denseThreshold(inf));
    }, function () { /* the table's request reports it */ });
    var scatterDone = getJSON("scatter").then(function (sc) {
      if (!current()) return;
      drawScatter(scatterBox, sc);
    });
    return Promise.all([tableDone, scatterDone]);
  }

  // The scatter: one canvas, points in a uniform grid index (cell = CELL CSS px) so hovering and
  // clicking cost O(points in the 3x3 neighbouring cells) even at 65k latents.
  var CELL = 8, HIT_RADIUS = 6;
  function drawScatter(box, sc) {
    var W = 560, H = 420, ML = 52, MR = 12, MT = 12, MB = 40;
    var ids = sc.ids, xs = sc.log10_frequency, ys = sc.log10_mean;
    var n = ids.length;
    box.appendChild(el("h3", { text: "log10 frequency \u00d7 log10 mean (" + n + " alive latents)" }));
    var canvas = el("canvas", { id: "scatter", "data-points": n, width: W, height: H, style: "width:" + W + "px;height:" + H + "px" });
    var tip = el("div", { id: "scatter-tip", class: "tip", hidden: true });
    var wrap = el("div", { class: "scatter-wrap" }, [canvas, tip]);
    box.appendChild(wrap);
    box.appendChild(el("p", { class: "muted", text: "click a point to open its latent" }));

    var dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    var ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);

    var ok = [], xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
    for (var i = 0; i < n; i++) {
      if (!isFinite(xs[i]) || !isFinite(ys[i])) continue;   // a non-finite value has no position
      ok.push(i);
      if (xs[i] < xmin) xmin = xs[i]; if (xs[i] > xmax) xmax = xs[i];
      if (ys[i] < ymin) ymin = ys[i]; if (ys[i] > ymax) ymax = ys[i];
    }
    if (!ok.length) { xmin = -1; xmax = 0; ymin = -1; ymax = 0; }
    function pad(lo, hi) { var d = hi - lo || 1; return [lo - 0.05 * d, hi + 0.05 * d]; }
    var xr = pad(xmin, xmax), yr = pad(ymin, ymax);
    var pw = W - ML - MR, ph = H - MT - MB;
    function sx(v) { return ML + (v - xr[0]) / (xr[1] - xr[0]) * pw; }
    function sy(v) { return MT + (1 - (v - yr[0]) / (yr[1] - yr[0])) * ph; }

    var px = new Float32Array(n).fill(NaN), py = new Float32Array(n).fill(NaN);
    ok.forEach(function (k) { px[k] = sx(xs[k]); py[k] = sy(ys[k]); });

    // Grid index by counting sort: cellStart[c]..cellStart[c+1] are the points of cell c.
    var gc = Math.ceil(W / CELL), gr = Math.ceil(H / CELL);
    var cellOf = new Int32Array(n).fill(-1), cellStart = new Int32Array(gc * gr + 1), items = new Int32Array(ok.length);
    ok.forEach(function (k) {
      var c = Math.min(gr - 1, Math.max(0, Math.floor(py[k] / CELL))) * gc + Math.min(gc - 1, Math.max(0, Math.floor(px[k] / CELL)));
      cellOf[k] = c; cellStart[c + 1]++;
    });
    for (var c = 0; c < gc * gr; c++) cellStart[c + 1] += cellStart[c];
    var fillPos = cellStart.slice(0, gc * gr);
    ok.forEach(function (k) { items[fillPos[cellOf[k]]++] = k; });

    function hit(x, y) {
      var cx = Math.floor(x / CELL), cy = Math.floor(y / CELL), best = -1, bestD = HIT_RADIUS * HIT_RADIUS;
      for (var gy = cy - 1; gy <= cy + 1; gy++) {
        if (gy < 0 || gy >= gr) continue;
        for (var gx = cx - 1; gx <= cx + 1; gx++) {
          if (gx < 0 || gx >= gc) continue;
          var cell = gy * gc + gx;
          for (var t = cellStart[cell]; t < cellStart[cell + 1]; t++) {
            var k = items[t], dx = px[k] - x, dy = py[k] - y, d = dx * dx + dy * dy;
            if (d < bestD || (d === bestD && best >= 0 && ids[k] < ids[best])) { bestD = d; best = k; }
          }
        }
      }
      return best;
    }

    function axes() {
      ctx.clearRect(0, 0, W, H);
      ctx.strokeStyle = "#bbb"; ctx.fillStyle = "#555"; ctx.lineWidth = 1;
      ctx.font = "11px sans-serif";
      ctx.strokeRect(ML + 0.5, MT + 0.5, pw, ph);
      ctx.textAlign = "center"; ctx.textBaseline = "top";
      ticks(xr).forEach(function (t) {
        var x = sx(t); ctx.beginPath(); ctx.moveTo(x, MT + ph); ctx.lineTo(x, MT + ph + 4); ctx.stroke();
        ctx.fillText(fmtTick(t), x, MT + ph + 6);
      });
      ctx.fillText("log10 frequency", ML + pw / 2, H - 14);
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      ticks(yr).forEach(function (t) {
        var y = sy(t); ctx.beginPath(); ctx.moveTo(ML - 4, y); ctx.lineTo(ML, y); ctx.stroke();
        ctx.fillText(fmtTick(t), ML - 6, y);
      });
      ctx.save(); ctx.translate(12, MT + ph / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
      ctx.fillText("log10 mean", 0, 0); ctx.restore();
    }
    var size = n > 5000 ? 1.5 : 3.5;
    function points() {
      ctx.fillStyle = n > 5000 ? "rgba(31,94,168,0.35)" : "rgba(31,94,168,0.75)";
      for (var t = 0; t < ok.length; t++) {
        var k = ok[t];
        ctx.fillRect(px[k] - size / 2, py[k] - size / 2, size, size);
      }
    }
    var base = null;
    axes(); points();
    try { base = ctx.getImageData(0, 0, canvas.width, canvas.height); } catch (e) { base = null; }
    function redraw(highlight) {
      if (base) ctx.putImageData(base, 0, 0); else { axes(); points(); }
      if (highlight >= 0) {
        ctx.strokeStyle = "#d62728"; ctx.lineWidth = 2;
        ctx.beginPath(); ctx.arc(px[highlight], py[highlight], 5, 0, 2 * Math.PI); ctx.stroke();
      }
    }

    function local(e) { var r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
    var hovered = -1;
    canvas.addEventListener("mousemove", function (e) {
      var p = local(e), k = hit(p[0], p[1]);
      if (k === hovered) return;
      hovered = k; redraw(k);
      canvas.style.cursor = k >= 0 ? "pointer" : "default";
      if (k < 0) { tip.hidden = true; return; }
      tip.hidden = false;
      tip.textContent = "latent " + ids[k] + " \u2014 freq " + fmt(Math.pow(10, xs[k])) + ", mean " + fmt(Math.pow(10, ys[k]));
      tip.style.left = Math.min(W - 160, px[k] + 10) + "px"; tip.style.top = Math.max(0, py[k] - 28) + "px";
    });
    canvas.addEventListener("mouseleave", function () { hovered = -1; redraw(-1); tip.hidden = true; });
    canvas.addEventListener("click", function (e) {
      var p = local(e), k = hit(p[0], p[1]);
      if (k >= 0) go("#/latent/" + ids[k]);
    });

    // Test hooks: positions in CSS px relative to the canvas's top-left corner.
    TEST.drawScatter = drawScatter;   // tests draw a synthetic scatter (e.g. 65k points) with it
    TEST.scatter = {
      size: [W, H],
      point: function (id) {
        var k = ids.indexOf(id);
        return k >= 0 && isFinite(px[k]) ? { x: px[k], y: py[k] } : null;
      },
      points: function () {
        return ok.map(function (k) { return { id: ids[k], x: px[k], y: py[k] }; });
      },
      hit: function (x, y) { var k = hit(x, y); return k >= 0 ? ids[k] : null; }
    };
  }
  function ticks(r) {
    var lo = Math.ceil(r[0]), hi = Math.floor(r[1]), out = [], step = 1;
    if (hi - lo < 1) { step = 0.25; lo = Math.ceil(r[0] * 4) / 4; hi = Math.floor(r[1] * 4) / 4; }
    if ((hi - lo) / step > 10) step = Math.ceil((hi - lo) / 10);
    for (var t = lo; t <= hi + 1e-9; t += step) out.push(Math.round(t * 100) / 100);
    return out;
  }
  function fmtTick(t) { return String(t); }

  // ======================================================================================
  // Latent page
  // ======================================================================================
  function latentPage(route, current) {
    var j = parseInt(route.arg, 10);
    if (!/^\d+$/.test(String(route.arg || "")) || !(j >= 0)) {
      throw new Error("#/latent/" + (route.arg || "") + ": a latent id is a non-negative integer, e.g. #/latent/0");
    }
    var pageData = info().then(function (inf) {
      if (j >= inf.d_sae) throw new Error("latent " + j + " is out of range: this SAE has " + inf.d_sae + " latents (ids 0.." + (inf.d_sae - 1) + ")");
      // A static export holds pages for some latents only (info.exported_latents).
      if (STATIC && Array.isArray(inf.exported_latents) && inf.exported_latents.indexOf(j) < 0) {
        throw new Error("latent " + j + " has no page in this export (it holds the " + inf.exported_latents.length +
                        " most frequent alive latents); re-export with more latents, or run `saeengine explore DIR` to browse all");
      }
      return Promise.all([getJSON("latent/" + j), inf]);
    });
    return pageData.then(function (res) {
      if (!current()) return;
      var L = res[0], inf = res[1];
      var has = hasPage(inf);
      // Neighbours with a page (every latent live; the exported ones in a static export).
      var prev = -1, next = -1;
      for (var a = j - 1; a >= 0; a--) if (has(a)) { prev = a; break; }
      for (var b = j + 1; b < inf.d_sae; b++) if (has(b)) { next = b; break; }
      var nav = el("div", { class: "latent-nav" }, [
        prev >= 0 ? el("a", { id: "prev-latent", href: "#/latent/" + prev, text: "\u2190 " + prev }) : null,
        el("a", { href: "#/latents", text: "all latents" }),
        next >= 0 ? el("a", { id: "next-latent", href: "#/latent/" + next, text: next + " \u2192" }) : null
      ]);
      view.appendChild(nav);
      view.appendChild(el("h2", { id: "latent-title", "data-latent": L.id, text: "Latent " + L.id + (L.note ? " \u2014 " + L.note : "") }));
      view.appendChild(el("div", { class: "stats" }, [
        stat("frequency", L.frequency), stat("mean", L.mean), stat("max", L.max)
      ]));
      view.appendChild(noteBox(L));

      var ex = L.exemplars || {};
      // The rules in saeengine.eval.exemplars' order, then any others the server adds.
      var rules = ["patch", "image", "cls"].filter(function (r) { return r in ex; })
        .concat(Object.keys(ex).filter(function (r) { return ["patch", "image", "cls"].indexOf(r) < 0; }));
      var exBox = el("section", { id: "exemplars" }, [el("h3", { text: "Top exemplars" })]);
      if (!rules.length) exBox.appendChild(el("p", { class: "muted", text: "no exemplars stored for this latent" }));
      rules.forEach(function (rule) {
        exBox.appendChild(el("div", { class: "rule", "data-rule": rule }, [
          el("h4", { text: ruleTitle(rule) }),
          (ex[rule] && ex[rule].length) ? thumbs(ex[rule], function (e) { return "image " + e.image + " \u00b7 " + fmt(e.value); })
            : el("p", { class: "muted", text: rule === "cls" ? "none: these tokens have no CLS token" : "none: the latent never fires" })
        ]));
      });
      view.appendChild(exBox);

      view.appendChild(el("section", { id: "quantiles" }, [
        el("h3", { text: "Quantile-sampled exemplars" }),
        (L.quantiles && L.quantiles.length) ? thumbs(L.quantiles, function (e) {
          return "q" + fmt(e.quantile) + " \u00b7 img " + e.image + " \u00b7 " + fmt(e.value);
        }) : el("p", { class: "muted", text: "the latent never fires: no quantiles" })
      ]));

      var side = el("div", { class: "two-col" });
      var histBox = el("section", { id: "histogram-box" }, [el("h3", { text: "Activation histogram (non-zero values)" })]);
      drawHistogram(histBox, L.histogram);
      side.appendChild(histBox);
      side.appendChild(el("section", { id: "coactivating" }, [
        el("h3", { text: "Co-activating latents" }),
        (L.coactivating && L.coactivating.length) ? el("ol", { class: "coact" }, L.coactivating.map(function (c) {
          return el("li", {}, [has(c.id) ? el("a", { href: "#/latent/" + c.id, "data-latent-id": c.id, text: "latent " + c.id })
                                          : el("span", { class: "no-page", "data-latent-id": c.id, title: "no page in this export", text: "latent " + c.id }),
                               el("span", { class: "muted", text: " " + fmt(c.score) })]);
        })) : el("p", { class: "muted", text: "none" })
      ]));
      view.appendChild(side);

      if (L.head_effect) {
        view.appendChild(el("section", { id: "head-effect" }, [
          el("h3", { text: "Head effect (head \u00b7 d_j)" }),
          el("div", { class: "two-col" }, [classList("promotes", L.head_effect.top, "head-top"),
                                           classList("suppresses", L.head_effect.bottom, "head-bottom")])
        ]));
      }
    });
  }
  function hasPage(inf) {
    if (!STATIC || !Array.isArray(inf.exported_latents)) return function () { return true; };
    var set = new Set(inf.exported_latents);
    return function (j) { return set.has(j); };
  }
  function ruleTitle(rule) {
    return { patch: "by max patch (heatmap)", image: "by image sum", cls: "by CLS token" }[rule] || rule;
  }
  function stat(name, v) { return el("span", { class: "stat", "data-stat": name }, [el("b", { text: name + " " }), fmt(v)]); }
  function thumbs(list, caption) {
    return el("div", { class: "thumbs" }, (list || []).map(function (e) {
      return el("figure", { "data-image": e.image }, [
        el("a", { href: STATIC ? null : "#/image/" + encodeURIComponent(e.image) }, [
          el("img", { src: thumbUrl(e.thumb), alt: "image " + e.image, loading: "lazy", width: 96, height: 96 })
        ]),
        el("figcaption", { text: caption(e) })
      ]);
    }));
  }
  function classList(title, rows, id) {
    return el("div", { id: id }, [el("h4", { text: title }), el("ol", {}, (rows || []).map(function (r) {
      return el("li", { "data-class": r.index }, [r.name + " ", el("span", { class: "muted", text: fmt(r.score) })]);
    }))]);
  }
  function noteBox(L) {
    var ta = el("textarea", { id: "note", rows: 2, readonly: STATIC,
                              placeholder: STATIC ? "no note (notes are edited in the live explorer)" : "a human name for this feature" });
    ta.value = L.note || "";
    var status = el("span", { id: "note-status", class: "muted" });
    var btn = STATIC ? null : el("button", { id: "save-note", type: "button", text: "Save note", onclick: function () {
      btn.disabled = true; status.textContent = "saving\u2026";
      request("PUT", "latent/" + L.id + "/note", { note: ta.value }).then(function (res) {
        status.textContent = "saved"; status.setAttribute("data-saved", res.note);
        document.getElementById("latent-title").textContent = "Latent " + res.id + (res.note ? " \u2014 " + res.note : "");
      }).catch(function (e) { status.textContent = ""; showError(e.message); })
        .finally(function () { btn.disabled = false; });
    } });
    return el("section", { id: "note-box" }, [el("label", { for: "note", text: "Note " }), ta, btn, status]);
  }

  function drawHistogram(box, hist) {
    var W = 460, H = 220, ML = 44, MR = 10, MT = 8, MB = 34;
    if (!hist || !hist.counts || !hist.counts.length) { box.appendChild(el("p", { class: "muted", text: "no activations" })); return; }
    var counts = hist.counts, edges = hist.edges, nb = counts.length;
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    var canvas = el("canvas", { id: "histogram", "data-bins": nb, "data-total": total, width: W, height: H, style: "width:" + W + "px;height:" + H + "px" });
    box.appendChild(canvas);
    box.appendChild(el("p", { class: "muted", text: total + " non-zero activations; bar height log10(1 + count)" }));
    var dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    var ctx = canvas.getContext("2d"); ctx.scale(dpr, dpr);
    var pw = W - ML - MR, ph = H - MT - MB;
    var top = Math.max(1e-9, Math.max.apply(null, counts.map(function (c) { return Math.log10(1 + c); })));
    ctx.fillStyle = "#1f5ea8";
    for (var b = 0; b < nb; b++) {
      var h = Math.log10(1 + counts[b]) / top * ph;
      ctx.fillRect(ML + b * pw / nb, MT + ph - h, Math.max(1, pw / nb - 1), h);
    }
    ctx.strokeStyle = "#bbb"; ctx.strokeRect(ML + 0.5, MT + 0.5, pw, ph);
    ctx.fillStyle = "#555"; ctx.font = "11px sans-serif"; ctx.textBaseline = "top";
    ctx.textAlign = "left"; ctx.fillText(fmt(edges[0]), ML, MT + ph + 4);
    ctx.textAlign = "right"; ctx.fillText(fmt(edges[edges.length - 1]), ML + pw, MT + ph + 4);
    ctx.textAlign = "center"; ctx.fillText("activation value", ML + pw / 2, MT + ph + 18);
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(String(Math.max.apply(null, counts)), ML - 4, MT + 6); ctx.fillText("0", ML - 4, MT + ph);
  }

  // ======================================================================================
  // Image page: dataset list / upload, patch grid, top latents of the selection, sliders
  // ======================================================================================
  var IMAGE_PAGE = 24;
  var painting = null;   // drag-selecting patches: true = adding, false = removing, null = not dragging
  document.addEventListener("mouseup", function () { painting = null; });
  function imagePage(route, current) {
    var listBox = el("aside", { id: "image-list-box" });
    var main = el("div", { id: "image-main" });
    view.appendChild(el("div", { class: "image-layout" }, [listBox, main]));
    var listPage = Math.max(0, parseInt(route.params.get("list") || "0", 10) || 0);
    var listDone = imageList(listBox, listPage, route.arg, current);
    if (route.arg === undefined) {
      main.appendChild(el("p", { class: "muted", text: "pick a dataset image on the left, or upload one" }));
      return listDone;
    }
    return Promise.all([listDone, imageDetail(main, route.arg, current)]);
  }

  function imageList(box, page, selected, current) {
    var upload = el("input", { id: "upload", type: "file", accept: "image/*", onchange: function () {
      if (!upload.files.length) return;
      var fd = new FormData(); fd.append("file", upload.files[0]);
      request("POST", "upload", fd, true).then(function (res) {
        go("#/image/" + encodeURIComponent(res.image));
      }).catch(function (e) { showError(e.message); upload.value = ""; });
    } });
    box.appendChild(el("label", { class: "upload" }, ["Upload an image ", upload]));
    return getJSON("images", { offset: page * IMAGE_PAGE, limit: IMAGE_PAGE }).then(function (res) {
      if (!current()) return;
      var pages = Math.max(1, Math.ceil(res.total / IMAGE_PAGE));
      box.appendChild(el("div", { id: "image-list", "data-total": res.total }, res.rows.map(function (r) {
        return el("a", { class: "image-item" + (String(r.image) === String(selected) ? " active" : ""), "data-image": r.image,
                         href: "#/image/" + encodeURIComponent(r.image) + "?list=" + page, title: r.name || ("image " + r.image) }, [
          el("img", { src: thumbUrl(r.thumb), alt: "image " + r.image, width: 56, height: 56, loading: "lazy" })
        ]);
      })));
      var base = selected === undefined ? "#/image" : "#/image/" + encodeURIComponent(selected);
      box.appendChild(el("div", { class: "pager" }, [
        el("a", { id: "images-prev", href: page > 0 ? base + "?list=" + (page - 1) : null, class: page > 0 ? "" : "disabled", text: "\u2190" }),
        el("span", { text: " " + (page + 1) + " / " + pages + " " }),
        el("a", { id: "images-next", href: page + 1 < pages ? base + "?list=" + (page + 1) : null, class: page + 1 < pages ? "" : "disabled", text: "\u2192" })
      ]));
    });
  }

  function imageDetail(main, image, current) {
    return Promise.all([getJSON("image/" + encodeURIComponent(image)), info()]).then(function (res) {
      if (!current()) return;
      var img = res[0], inf = res[1];
      var st = { image: img.image, grid: img.grid, selected: new Set(), sliders: new Map(), clean: img.probs };
      state.image = st;
      var gh = img.grid[0], gw = img.grid[1];

      // Patch grid: the image under a CSS grid of clickable cells. Drag paints a selection.
      var SIZE = 320;
      var grid = el("div", { id: "patch-grid", class: "patch-grid", "data-grid": gh + "x" + gw,
                             style: "width:" + SIZE + "px;height:" + SIZE + "px;grid-template-columns:repeat(" + gw + ",1fr);grid-template-rows:repeat(" + gh + ",1fr)" });
      for (var p = 0; p < gh * gw; p++) {
        (function (pi) {
          var cell = el("div", { class: "patch", "data-patch": pi, title: "patch " + pi + " (row " + Math.floor(pi / gw) + ", col " + (pi % gw) + ")" });
          cell.addEventListener("mousedown", function (e) {
            e.preventDefault();
            painting = !st.selected.has(pi);
            setPatch(pi, painting);
          });
          cell.addEventListener("mouseenter", function (e) {
            if (painting !== null && (e.buttons & 1)) setPatch(pi, painting);
          });
          grid.appendChild(cell);
        })(p);
      }
      function setPatch(pi, on) {
        if (on) st.selected.add(pi); else st.selected.delete(pi);
        var c = grid.querySelector('.patch[data-patch="' + pi + '"]');
        if (c) c.classList.toggle("selected", on);
        selectionChanged();
      }
      var imgEl = el("img", { id: "image-view", src: thumbUrl(img.thumb), alt: "image " + img.image, width: SIZE, height: SIZE });
      var selInfo = el("span", { id: "selection-info", class: "muted", text: "no patches selected (edits apply to all patches)" });
      var figure = el("div", { class: "image-stack", style: "width:" + SIZE + "px;height:" + SIZE + "px" }, [imgEl, grid]);
      var buttons = el("div", { class: "controls" }, [
        el("button", { id: "select-all", type: "button", text: "all", onclick: function () {
          for (var q = 0; q < gh * gw; q++) { st.selected.add(q); grid.children[q].classList.add("selected"); }
          selectionChanged();
        } }),
        el("button", { id: "select-none", type: "button", text: "none", onclick: function () {
          st.selected.clear(); Array.prototype.forEach.call(grid.children, function (c) { c.classList.remove("selected"); });
          selectionChanged();
        } }),
        selInfo
      ]);
      var left = el("section", { id: "image-panel" }, [
        el("h2", { id: "image-title", "data-image": img.image, text: "Image " + img.image }), figure, buttons
      ]);
      var latentsBox = el("section", { id: "patch-latents", "data-version": 0, "data-pending": 0, "data-patches": "[]" }, [
        el("h3", { text: "Top latents of the selection" }),
        el("p", { class: "muted", text: "select patches to list their latents" })
      ]);
      var steerBox = el("section", { id: "steer" }, [el("h3", { text: "Steer: z_j := s \u00d7 max_j (error term kept)" })]);
      var sliders = el("div", { id: "sliders" }, [el("p", { class: "muted", id: "sliders-empty", text: "add a latent with its \u201csteer\u201d button" })]);
      steerBox.appendChild(sliders);
      var probs = el("div", { id: "probs", class: "two-col", "data-version": 0, "data-pending": 0 });
      steerBox.appendChild(probs);
      left.appendChild(latentsBox);
      main.appendChild(el("div", { class: "image-cols" }, [left, steerBox]));

      if (!inf.has_head || !img.probs) {
        probs.appendChild(el("p", { id: "no-head", class: "muted", text: "no classifier head here, so there are no probabilities to show" +
                                    (inf.model_note ? " (" + inf.model_note + ")" : "") }));
      } else {
        renderProbs(probs, img.probs, img.probs);
      }

      // ---- selection -> POST /api/patches (debounced; stale answers dropped)
      // A response is shown only when no newer selection was made since its request (seq).
      var patchSeq = 0;
      var fetchPatches = debounce(function () {
        var patches = Array.from(st.selected).sort(function (a, b) { return a - b; });
        var seq = patchSeq;
        if (!patches.length) {
          latentsBox.setAttribute("data-pending", 0); latentsBox.setAttribute("data-patches", "[]");
          clear(latentsBox).appendChild(el("h3", { text: "Top latents of the selection" }));
          latentsBox.appendChild(el("p", { class: "muted", text: "select patches to list their latents" }));
          return;
        }
        var body = { image: st.image, patches: patches };
        request("POST", "patches", body).then(function (res) {
          if (seq !== patchSeq || !current()) return;
          TEST.lastPatches = { request: body, response: res };
          renderPatchLatents(latentsBox, res.latents, st, addSlider);
          latentsBox.setAttribute("data-patches", JSON.stringify(patches));
          latentsBox.setAttribute("data-version", +latentsBox.getAttribute("data-version") + 1);
          latentsBox.setAttribute("data-pending", 0);
        }).catch(function (e) { if (seq === patchSeq) { latentsBox.setAttribute("data-pending", 0); showError(e.message); } });
      }, DEBOUNCE_MS);
      function selectionChanged() {
        var n = st.selected.size;
        selInfo.textContent = n ? n + " patch" + (n > 1 ? "es" : "") + " selected (edits apply to these)" : "no patches selected (edits apply to all patches)";
        patchSeq++;
        latentsBox.setAttribute("data-pending", 1);
        fetchPatches();
        if (st.sliders.size) intervene();
      }

      // ---- sliders -> POST /api/intervene (debounced; stale answers dropped)
      function addSlider(latent) {
        if (st.sliders.has(latent) || STATIC) return;
        var empty = document.getElementById("sliders-empty");
        if (empty) empty.remove();
        var out = el("output", { class: "scale-value", text: "1.0" });
        var input = el("input", { type: "range", class: "slider", "data-latent": latent, min: SCALE_MIN, max: SCALE_MAX,
                                  step: SCALE_STEP, value: 1, "aria-label": "scale of latent " + latent });
        var row = el("div", { class: "slider-row", "data-latent": latent }, [
          el("a", { href: "#/latent/" + latent, "data-latent-id": latent, text: "latent " + latent }),
          input, out, el("span", { class: "z-value muted", "data-latent": latent }),
          el("button", { type: "button", class: "remove-slider", title: "remove this edit", text: "\u00d7", onclick: function () {
            st.sliders.delete(latent); row.remove(); intervene();
          } })
        ]);
        input.addEventListener("input", function () { out.textContent = (+input.value).toFixed(1); intervene(); });
        st.sliders.set(latent, input);
        sliders.appendChild(row);
        intervene();
      }
      var intSeq = 0;   // as patchSeq: bumped by every edit, so only the newest answer is drawn
      var sendIntervene = debounce(function () {
        if (!inf.has_head || !img.probs) return;
        var edits = [];
        st.sliders.forEach(function (input, latent) { edits.push({ latent: latent, scale: +input.value }); });
        var seq = intSeq;
        if (!edits.length) { renderProbs(probs, st.clean, st.clean); probs.setAttribute("data-pending", 0); return; }
        var patches = st.selected.size ? Array.from(st.selected).sort(function (a, b) { return a - b; }) : null;
        var body = { image: st.image, patches: patches, edits: edits };
        request("POST", "intervene", body).then(function (res) {
          if (seq !== intSeq || !current()) return;
          TEST.lastIntervene = { request: body, response: res };
          renderProbs(probs, res.before, res.after);
          (res.edits || []).forEach(function (e) {   // the code value each scale set: z_j = s * max_j
            var z = sliders.querySelector('.z-value[data-latent="' + e.latent + '"]');
            if (z && typeof e.value === "number") z.textContent = "z = " + fmt(e.value);
          });
          probs.setAttribute("data-request", JSON.stringify(body));
          probs.setAttribute("data-version", +probs.getAttribute("data-version") + 1);
          probs.setAttribute("data-pending", 0);
        }).catch(function (e) { if (seq === intSeq) { probs.setAttribute("data-pending", 0); showError(e.message); } });
      }, DEBOUNCE_MS);
      function intervene() {
        if (!inf.has_head || !img.probs) return;
        intSeq++;
        probs.setAttribute("data-pending", 1);
        sendIntervene();
      }
    });
  }

  function renderPatchLatents(box, latents, st, addSlider) {
    clear(box).appendChild(el("h3", { text: "Top latents of the selection" }));
    if (!latents.length) { box.appendChild(el("p", { class: "muted", text: "no latent fires on these patches" })); return; }
    var list = el("ol", { id: "patch-latent-list" });
    latents.forEach(function (L) {
      list.appendChild(el("li", { class: "patch-latent", "data-latent-id": L.id, "data-value": L.value }, [
        el("div", { class: "patch-latent-head" }, [
          el("a", { href: "#/latent/" + L.id, text: "latent " + L.id }),
          el("span", { class: "muted", text: " summed code " + fmt(L.value) + " " }),
          STATIC ? null : el("button", { type: "button", class: "add-slider", "data-latent": L.id, text: "steer", onclick: function () { addSlider(L.id); } })
        ]),
        thumbs((L.exemplars || []).slice(0, 5), function (e) { return "img " + e.image + " \u00b7 " + fmt(e.value); })
      ]));
    });
    box.appendChild(list);
  }

  // Before/after bars for the same classes; data-p keeps the full-precision probability.
  function renderProbs(box, before, after) {
    clear(box);
    function bars(id, title, rows, ref) {
      var refP = {};
      (ref || []).forEach(function (r) { refP[r.index] = r.p; });
      return el("div", { id: id, class: "probs" }, [el("h4", { text: title })].concat((rows || []).map(function (r) {
        var d = ref && r.index in refP ? r.p - refP[r.index] : 0;
        return el("div", { class: "prob", "data-class": r.index, "data-p": String(r.p) }, [
          el("span", { class: "prob-name", title: r.name, text: r.name }),
          el("span", { class: "bar" }, [el("span", { class: "fill" + (d > 1e-4 ? " up" : d < -1e-4 ? " down" : ""), style: "width:" + Math.max(0, Math.min(100, 100 * r.p)).toFixed(2) + "%" })]),
          el("span", { class: "prob-value", text: pct(r.p) })
        ]);
      })));
    }
    box.appendChild(bars("probs-before", "before", before, null));
    box.appendChild(bars("probs-after", "after", after, before));
  }

  // ======================================================================================
  // Compare page
  // ======================================================================================
  function comparePage(route, current) {
    return info().then(function (inf) {
      if (!current()) return;
      var others = inf.compare || [];
      if (!others.length) {
        view.appendChild(el("p", { id: "compare-none", class: "muted", text: "no second SAE: start the explorer with --compare NAME=DIR to compare two SAEs (backbones or layers) on one image" }));
        return;
      }
      var image = route.params.get("image") || (state.image ? String(state.image.image) : "0");
      var other = others.indexOf(route.params.get("other")) >= 0 ? route.params.get("other") : others[0];
      var imgInput = el("input", { id: "compare-image", value: image, size: 10, "aria-label": "image" });
      var otherSel = el("select", { id: "compare-other" }, others.map(function (o) { return el("option", { value: o, text: o, selected: o === other }); }));
      view.appendChild(el("form", { class: "controls", onsubmit: function (e) {
        e.preventDefault();
        go("#/compare?" + new URLSearchParams({ image: imgInput.value.trim(), other: otherSel.value }).toString());
      } }, [el("label", {}, ["image ", imgInput]), el("label", {}, [" other SAE ", otherSel]), el("button", { type: "submit", text: "Compare" })]));
      return getJSON("compare", { image: image, other: other }).then(function (res) {
        if (!current()) return;
        function col(title, id, side, linked) {
          return el("section", { id: id, class: "compare-col" }, [el("h3", { text: title }), el("ol", {}, ((side && side.latents) || []).map(function (L) {
            return el("li", { "data-latent-id": L.id, "data-value": L.value }, [
              L.thumb ? el("img", { src: thumbUrl(L.thumb), alt: "latent " + L.id, width: 56, height: 56, loading: "lazy" }) : null,
              el("span", {}, [linked ? el("a", { href: "#/latent/" + L.id, text: "latent " + L.id }) : "latent " + L.id,
                              el("span", { class: "muted", text: L.value !== undefined ? " summed " + fmt(L.value) : "" })])
            ]);
          }))]);
        }
        var nearest = el("section", { id: "compare-nearest" }, [
          el("h3", { text: "Nearest latent in " + other + " (cosine of per-image activation profiles)" }),
          el("table", {}, [el("thead", {}, [el("tr", {}, [el("th", { text: "this" }), el("th", { text: other }), el("th", { text: "cosine" })])]),
            el("tbody", {}, (res.nearest || []).map(function (r) {
              return el("tr", { "data-latent-id": r.id, "data-other-id": r.other_id, "data-cosine": r.cosine }, [
                el("td", {}, [el("a", { href: "#/latent/" + r.id, text: String(r.id) })]),
                el("td", { text: String(r.other_id) }), el("td", { class: "num", text: fmt(r.cosine) })]);
            }))])]);
        view.appendChild(el("h2", { id: "compare-title", "data-image": res.image !== undefined ? res.image : image, text: "Image " + image }));
        view.appendChild(el("div", { class: "two-col" }, [
          el("img", { id: "compare-image-view", src: thumbUrl("/api/thumb/" + encodeURIComponent(res.image !== undefined ? res.image : image)), alt: "image " + image, width: 160, height: 160 }),
          col(inf.title || "this SAE", "compare-this", res["this"], true),
          col(other, "compare-other-latents", res.other, false),
          nearest]));
      });
    });
  }

  // ----- boot ------------------------------------------------------------------------------
  if (STATIC) document.body.classList.add("static");
  window.addEventListener("hashchange", render);
  info().then(function (inf) {
    var t = inf.title || "saeengine explorer";
    document.getElementById("title").textContent = t;
    document.title = t;
    var meta = [inf.backbone, inf.layer !== undefined && inf.layer !== null ? "layer " + inf.layer : null,
                inf.d_sae + " latents", inf.n_images + " images", inf.n_tokens + " tokens", STATIC ? "static export" : null];
    document.getElementById("meta").textContent = meta.filter(Boolean).join(" \u00b7 ");
    if (!inf.compare || !inf.compare.length) {
      var c = document.querySelector('#nav a[data-page="compare"]');
      if (c) c.title = "start with --compare to compare two SAEs";
    }
  }).catch(function (e) { showError(e.message); });
  render();
})();
