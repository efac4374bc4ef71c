// courierd's operator page: the dashboard (#/) and one order (#/orders/{id}).
// Plain DOM, no dependencies, nothing loaded from elsewhere; data from the dispatch API
// (/v1/...), polled every 2 s. Text from the API only ever goes in as text nodes.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TOKEN_KEY = "courierd.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const M_PER_DEG = 111320; // metres per degree of latitude (and of longitude × cos lat)
  const STATE_LABELS = {
    new: "new",
    dasher_confirmed: "confirmed",
    arriving_at_store: "arriving at store",
    arrived_at_store: "at store",
    dasher_out_for_delivery: "out for delivery",
    dropoff: "dropped off",
    cancelled: "cancelled",
  };

  const view = document.getElementById("view");
  const login = document.getElementById("login");
  const healthPill = document.getElementById("health");
  const statusLine = document.getElementById("status");
  let timer = null;
  let generation = 0; // bumped on navigation: answers for an older view are dropped

  // -- DOM helpers ------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") el.textContent = String(value);
      else el.setAttribute(key, String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function table(headers, rows, empty) {
    if (!rows.length) return h("p", { class: "empty", text: empty });
    return h(
      "table",
      {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { text: t })))),
      h("tbody", {}, rows),
    );
  }

  function card(title, attrs, ...children) {
    const cls = "card" + (attrs && attrs.wide ? " wide" : "");
    return h("section", { class: cls, id: attrs && attrs.id }, h("h2", { text: title }), children);
  }

  // -- formatting -------------------------------------------------------------------

  function clock(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleTimeString([], { hour12: false });
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = (Date.now() - new Date(iso).getTime()) / 1000;
    return isNaN(s) ? iso : duration(Math.max(0, s)) + " ago";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function stateLabel(state) {
    return STATE_LABELS[state] || state;
  }

  function orderLink(id) {
    return h("a", { href: "#/orders/" + encodeURIComponent(id), class: "mono", text: id });
  }

  function source(src) {
    return h("span", { class: "src src-" + src, text: src });
  }

  // -- the API ----------------------------------------------------------------------

  class AuthNeeded extends Error {}

  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const reply = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await reply.json();
    } catch (_) {
      body = null;
    }
    if (reply.status === 401) throw new AuthNeeded((body && body.message) || "token needed");
    if (!reply.ok) {
      const error = new Error((body && body.message) || reply.status + " " + reply.statusText);
      error.status = reply.status;
      throw error;
    }
    return body;
  }

  function askForToken(message) {
    stop();
    const had = sessionStorage.getItem(TOKEN_KEY);
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("login-error").textContent = had ? "That token was refused." : "";
    login.hidden = false;
    view.hidden = true;
    statusLine.textContent = message;
    document.getElementById("token-input").focus();
  }

  login.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    const token = input.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    input.value = "";
    login.hidden = true;
    view.hidden = false;
    refresh();
  });

  // -- polling ----------------------------------------------------------------------

  function stop() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  async function refresh() {
    stop();
    const mine = ++generation;
    const route = location.hash.match(/^#\/orders\/(.+)$/);
    try {
      const content = route ? await orderView(decodeURIComponent(route[1])) : await dashboard();
      if (mine !== generation) return;
      view.replaceChildren(...content);
      statusLine.textContent = "updated " + clock(new Date().toISOString());
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof AuthNeeded) return askForToken(error.message);
      statusLine.textContent = "not updated: " + error.message;
      if (error.status === 404 || !view.querySelector(".card")) {
        view.replaceChildren(h("p", { class: "banner", text: error.message }), backLink());
      }
    }
    if (mine === generation) timer = setTimeout(refresh, POLL_MS);
  }

  function backLink() {
    return h("p", {}, h("a", { href: "#/", text: "← all orders" }));
  }

  window.addEventListener("hashchange", refresh);

  // -- the dashboard ----------------------------------------------------------------

  async function dashboard() {
    const d = await api("/v1/dashboard");
    showHealth(d.health, d.auth_paused);
    const counts = Object.entries(d.orders_by_state).map(([state, n]) =>
      h(
        "div",
        { class: "state-count" + (n ? "" : " zero"), "data-state": state },
        h("span", { class: "n", text: n }),
        h("span", { class: "label", text: stateLabel(state) }),
      ),
    );
    const active = d.active_orders.map((o) =>
      h(
        "tr",
        { "data-order-id": o.order_id },
        h("td", {}, orderLink(o.order_id)),
        h("td", { class: "state", "data-state": o.state, text: stateLabel(o.state) }),
        h("td", { class: "mono", text: o.courier_id || "—" }),
        h("td", { title: o.updated_at, text: ago(o.updated_at) }),
        h("td", {}, o.cancelling ? h("span", { class: "pill warn", text: "cancelling" }) : ""),
      ),
    );
    const offline = d.couriers_offline.map((c) =>
      h(
        "tr",
        { "data-courier-id": c.courier_id },
        h("td", { class: "mono", text: c.courier_id }),
        h("td", { title: c.last_seen || "", text: ago(c.last_seen) }),
        h("td", {}, c.order_ids.map((id, i) => [i ? ", " : "", orderLink(id)])),
      ),
    );
    const box = d.outbox;
    const stat = (label, value, cls) =>
      h("div", { class: "stat " + (cls || "") }, h("span", { class: "n", text: value }), h("span", { class: "label", text: label }));
    const dead = d.dead_letters.map((x) =>
      h(
        "tr",
        { "data-reason": x.reason },
        h("td", { title: x.received_at, text: clock(x.received_at) }),
        h("td", { class: "mono", text: x.topic }),
        h("td", {}, h("span", { class: "pill bad", text: x.reason })),
        h("td", { text: x.detail || "" }),
        h("td", { class: "mono", title: x.payload, text: x.payload.slice(0, 60) }),
      ),
    );
    const more = d.active_truncated ? ` (showing ${d.active_orders.length})` : "";
    return [
      h(
        "div",
        { class: "grid" },
        card("Orders by state", { wide: true, id: "orders-by-state" }, h("div", { class: "states" }, counts)),
        card(
          `Active orders: ${d.active_total}${more}`,
          { wide: true, id: "active-orders" },
          table(["order", "state", "courier", "updated", ""], active, "No active orders."),
        ),
        card(
          "Outbox",
          { id: "outbox" },
          h(
            "div",
            { class: "stats" },
            stat("pending pushes", box.pending),
            stat("oldest pending", duration(box.oldest_pending_age_s)),
            stat("failed (parked)", box.failed, box.failed ? "error" : ""),
            stat("held by a cancel", box.held),
          ),
          h(
            "p",
            { id: "auth" },
            "OneTablet key: ",
            d.auth_paused
              ? h("span", { class: "pill bad", text: "refused (401): pushes paused" })
              : h("span", { class: "pill ok", text: "accepted" }),
          ),
        ),
        card(
          `Couriers offline: ${d.couriers_offline.length}`,
          { id: "couriers-offline" },
          table(["courier", "last seen", "orders"], offline, "All couriers with active orders are online."),
        ),
        card(
          `Last dead letters (${box.dead_letters} kept)`,
          { wide: true, id: "dead-letters" },
          table(["at", "topic", "reason", "detail", "payload"], dead, "No dead letters."),
        ),
      ),
    ];
  }

  function showHealth(health, paused) {
    const ok = health.status === "ok";
    healthPill.className = "pill " + (ok ? "ok" : health.status === "unknown" ? "" : "bad");
    healthPill.textContent = ok ? "healthy" : health.status === "unknown" ? "health unknown" : "unhealthy";
    healthPill.title = (health.reasons || []).join("\n") + (paused ? "\nOneTablet key refused" : "");
  }

  // -- one order --------------------------------------------------------------------

  async function orderView(id) {
    const path = "/v1/orders/" + encodeURIComponent(id);
    const [order, track] = await Promise.all([api(path), api(path + "/track")]);
    const transitions = order.transitions.map((t) =>
      h(
        "tr",
        { "data-status": t.status },
        h("td", { class: "state", text: stateLabel(t.status) }),
        h("td", {}, source(t.source)),
        h("td", { title: t.at, text: clock(t.at) }),
        h("td", { class: "mono", text: t.lat === undefined ? "—" : `${t.lat.toFixed(5)}, ${t.lng.toFixed(5)}` }),
      ),
    );
    const pushes = order.pushes.map((p) =>
      h(
        "tr",
        { "data-status": p.status },
        h("td", { class: "state", text: stateLabel(p.status) }),
        h("td", {}, h("span", { class: "pill " + (p.delivered ? "ok" : p.state === "failed" ? "bad" : "warn"), text: p.state })),
        h("td", { text: p.attempts }),
        h("td", { class: p.last_error ? "error" : "muted", text: p.last_error || "—" }),
      ),
    );
    const eta = order.eta ? `${duration(order.eta.seconds)} to ${order.eta.to} (${order.eta.distance_m} m)` : "—";
    const courier = order.courier_id
      ? [h("b", { class: "mono", text: order.courier_id }), order.courier_offline ? h("span", { class: "pill bad", text: "offline" }) : ""]
      : [h("b", { text: "none yet" })];
    return [
      backLink(),
      h(
        "div",
        { class: "order-head" },
        h("h1", {}, "Order ", h("span", { class: "mono", id: "order-id", text: order.order_id })),
        h("span", { class: "pill " + (order.cancelled ? "bad" : "ok"), id: "order-state", text: stateLabel(order.state) }),
        order.cancelling ? h("span", { class: "pill warn", text: "cancelling" }) : "",
      ),
      h(
        "div",
        { class: "facts" },
        h("span", {}, "courier ", courier),
        h("span", {}, "last seen ", h("b", { text: ago(order.courier_last_seen) })),
        h("span", {}, "ETA ", h("b", { text: eta })),
      ),
      h(
        "div",
        { class: "grid" },
        card("Track", { wide: true, id: "track" }, drawTrack(track), legend(track)),
        card("Transitions", { id: "transitions" }, table(["status", "source", "at", "where"], transitions, "No transitions yet.")),
        card("Pushes to OneTablet", { id: "pushes" }, table(["status", "state", "attempts", "last error"], pushes, "No pushes yet.")),
      ),
    ];
  }

  function legend(track) {
    const fixes = track.points.length + " fixes" + (track.truncated ? " (the latest)" : "");
    return h(
      "div",
      { class: "legend" },
      h("span", {}, h("span", { class: "swatch pickup" }), "pickup: radius, and exit radius (dashed)"),
      h("span", {}, h("span", { class: "swatch dropoff" }), "dropoff"),
      h("span", {}, h("span", { class: "swatch route" }), "courier's track, " + fixes),
      h("span", {}, h("span", { class: "swatch marker" }), "where a status fired"),
    );
  }

  // A local equirectangular projection in metres: x east, y south (SVG's y runs down).
  function drawTrack(track) {
    const places = [["pickup", track.pickup], ["dropoff", track.dropoff]].filter(([, p]) => p);
    const marks = track.transitions.filter((t) => t.lat !== null && t.lng !== null);
    const lats = [...track.points.map((p) => p.lat), ...places.map(([, p]) => p.lat), ...marks.map((t) => t.lat)];
    const lngs = [...track.points.map((p) => p.lng), ...places.map(([, p]) => p.lng), ...marks.map((t) => t.lng)];
    if (!lats.length) return h("p", { class: "empty", text: "No positions or places known for this order yet." });
    const lat0 = (Math.min(...lats) + Math.max(...lats)) / 2;
    const lng0 = (Math.min(...lngs) + Math.max(...lngs)) / 2;
    const k = Math.cos((lat0 * Math.PI) / 180);
    const xy = (lat, lng) => [(lng - lng0) * k * M_PER_DEG, -(lat - lat0) * M_PER_DEG];

    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    const grow = (x, y, r) => {
      x0 = Math.min(x0, x - r); y0 = Math.min(y0, y - r);
      x1 = Math.max(x1, x + r); y1 = Math.max(y1, y + r);
    };
    for (const [, p] of places) grow(...xy(p.lat, p.lng), p.exit_radius_m);
    for (const p of track.points) grow(...xy(p.lat, p.lng), 0);
    for (const t of marks) grow(...xy(t.lat, t.lng), 0);
    const span = Math.max(x1 - x0, y1 - y0, 100);
    const pad = span * 0.08;
    const unit = span / 100; // marker and label sizes follow the zoom
    const svg = s("svg", {
      class: "map",
      id: "track-svg",
      viewBox: [x0 - pad, y0 - pad, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad].map((v) => v.toFixed(1)).join(" "),
      preserveAspectRatio: "xMidYMid meet",
      role: "img",
      "aria-label": "the courier's track, the pickup and dropoff, and where each status fired",
    });

    for (const [name, p] of places) {
      const [x, y] = xy(p.lat, p.lng);
      svg.append(
        s("circle", { class: `place exit ${name}`, cx: x, cy: y, r: p.exit_radius_m, "vector-effect": "non-scaling-stroke", "data-place": name, "data-kind": "exit" },
          s("title", { text: `${name}: exit radius ${Math.round(p.exit_radius_m)} m` })),
        s("circle", { class: `place radius ${name}`, cx: x, cy: y, r: p.radius_m, "vector-effect": "non-scaling-stroke", "data-place": name, "data-kind": "radius" },
          s("title", { text: `${name}: radius ${Math.round(p.radius_m)} m` })),
        s("text", { class: "place-label", x, y: y + p.exit_radius_m + unit * 3.6, "text-anchor": "middle", "font-size": unit * 3, text: name }),
      );
    }
    if (track.points.length) {
      const line = track.points.map((p) => xy(p.lat, p.lng).map((v) => v.toFixed(1)).join(",")).join(" ");
      svg.append(s("polyline", { class: "route", points: line, "vector-effect": "non-scaling-stroke" }));
      for (const p of track.points) {
        const [x, y] = xy(p.lat, p.lng);
        svg.append(s("circle", { class: "fix", cx: x, cy: y, r: unit * 0.45 }, s("title", { text: clock(p.ts) })));
      }
    }
    marks.forEach((t, i) => {
      const [x, y] = xy(t.lat, t.lng);
      svg.append(
        s("circle", { class: `status-marker src-${t.source}`, cx: x, cy: y, r: unit * 1.3, "vector-effect": "non-scaling-stroke", "data-status": t.status },
          s("title", { text: `${t.status} (${t.source}) at ${clock(t.at)}` })),
        s("text", { x: x + unit * 1.8, y: y + unit * (1.1 + 3.4 * (i % 2)), "font-size": unit * 2.8, text: stateLabel(t.status) }),
      );
    });
    const last = track.points[track.points.length - 1];
    if (last && !["dropoff", "cancelled", "expired"].includes(track.state)) {
      const [x, y] = xy(last.lat, last.lng);
      svg.append(s("circle", { class: "courier", cx: x, cy: y, r: unit * 1.6, "vector-effect": "non-scaling-stroke" }, s("title", { text: "courier, " + ago(last.ts) })));
    }
    svg.append(scaleBar(x0 - pad, y1 + pad, span, unit));
    return svg;
  }

  function scaleBar(left, bottom, span, unit) {
    const target = span / 5;
    const step = [1, 2, 5].map((m) => m * 10 ** Math.floor(Math.log10(target))).filter((v) => v <= target).pop() || target;
    const x = left + unit * 3;
    const y = bottom - unit * 3;
    return s(
      "g",
      { class: "scale-bar" },
      s("line", { class: "scale", x1: x, y1: y, x2: x + step, y2: y, "vector-effect": "non-scaling-stroke" }),
      s("text", { x, y: y - unit * 1.2, "font-size": unit * 2.6, text: step >= 1000 ? step / 1000 + " km" : step + " m" }),
    );
  }

  refresh();
})();
