// courierd's operator page: the dashboard (#/), one order (#/orders/{id}) and the stores'
// learned pickup points (#/stores). Plain DOM, no dependencies, nothing loaded from
// elsewhere; data from the dispatch API (/v1/...), polled every 2 s (the stores every
// 60 s: learning them reads every stay), and the health pill from /healthz every 2 s on
// every view. Text from the API only ever goes in as text nodes.
//
// An order's view replays its geofence statuses with other settings when the URL says so:
// `?geofence.approach_m=300` in the page's address (before or after the #), as
// `courierd replay --set geofence.approach_m=300` would.
"use strict";

(() => {
  const POLL_MS = 2000;
  const OVERRIDE_PREFIX = "geofence.";
  const STORE_DRAWINGS = 12;
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

  // The route and its settings: "#/orders/o-1?geofence.radius_m=150", "#/stores".
  function route() {
    const [path, query] = location.hash.replace(/^#/, "").split(/\?(.*)/s, 2);
    const params = new URLSearchParams(location.search);
    for (const [key, value] of new URLSearchParams(query || "")) params.set(key, value);
    return { path: path || "/", params };
  }

  function overrides(params) {
    return [...params].filter(([key]) => key.startsWith(OVERRIDE_PREFIX));
  }

  async function refresh() {
    stop();
    const mine = ++generation;
    const { path, params } = route();
    const order = path.match(/^\/orders\/(.+)$/);
    const stores = path === "/stores";
    try {
      const content = order
        ? await orderView(decodeURIComponent(order[1]), overrides(params))
        : stores
          ? await storesView(params)
          : await dashboard();
      if (mine !== generation) return;
      const typing = view.contains(document.activeElement) && document.activeElement.matches("input, select");
      if (!typing) view.replaceChildren(...content); // never under the operator's cursor
      statusLine.textContent = "updated " + clock(new Date().toISOString());
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof AuthNeeded) return askForToken(error.message);
      statusLine.textContent = "not updated: " + error.message;
      if (error.status === 404 || !view.querySelector(".card")) {
        view.replaceChildren(h("p", { class: "banner", text: error.message }), backLink());
      }
    }
    // The stores view is not polled: its figures change by the day, and each reading
    // walks every stay (the server keeps one for 5 minutes).
    if (mine === generation && !stores) timer = setTimeout(refresh, POLL_MS);
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

  // The health pill on every view, not only the dashboard's: /healthz (no token needed,
  // and its 503 is an answer too), polled on its own whatever the view and the token.
  async function pollHealth() {
    try {
      const reply = await fetch("/healthz", { headers: { Accept: "application/json" }, cache: "no-store" });
      const report = await reply.json();
      showHealth(report, report.onetablet === "unauthorized");
    } catch (error) {
      showHealth({ status: "unknown", reasons: ["health not read: " + error.message] }, false);
    }
    setTimeout(pollHealth, POLL_MS);
  }

  // -- one order --------------------------------------------------------------------

  async function orderView(id, tuned) {
    const path = "/v1/orders/" + encodeURIComponent(id);
    const whatIf = tuned.length ? replayOf(path, tuned) : Promise.resolve(null);
    const [order, track, replay] = await Promise.all([api(path), api(path + "/track"), whatIf]);
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
        card("Track", { wide: true, id: "track" }, drawTrack(track, replay), legend(track, replay)),
        replayCard(id, tuned, replay),
        card("Transitions", { id: "transitions" }, table(["status", "source", "at", "where"], transitions, "No transitions yet.")),
        card("Pushes to OneTablet", { id: "pushes" }, table(["status", "state", "attempts", "last error"], pushes, "No pushes yet.")),
      ),
    ];
  }

  // The replay with the URL's overrides; a refused override is shown, not thrown.
  async function replayOf(path, tuned) {
    try {
      return await api(path + "/replay?" + new URLSearchParams(tuned));
    } catch (error) {
      if (error instanceof AuthNeeded || error.status !== 400) throw error;
      return { error: error.message };
    }
  }

  function replayCard(id, tuned, replay) {
    const title = "What if: " + (tuned.length ? tuned.map(([k, v]) => `${k}=${v}`).join(", ") : "other geofence settings");
    const body = [];
    if (!tuned.length) {
      body.push(h("p", { class: "muted", text: "Replay this order's fixes with other geofence settings: add ?geofence.KEY=VALUE to the address (e.g. ?geofence.approach_m=300), or:" }));
    } else if (replay.error) {
      body.push(h("p", { class: "banner", id: "replay-error", text: replay.error }));
    } else if (!replay.fixes) {
      body.push(h("p", { class: "empty", text: "No fixes of this order were kept for the rules: nothing to replay." }));
    } else {
      if (replay.missing_fixes) {
        body.push(h("p", { class: "banner", text: `${replay.missing_fixes} of the fixes the rules consumed are pruned: this replay is not faithful.` }));
      }
      const rows = replay.statuses.map((st) =>
        h(
          "tr",
          { "data-status": st.status, "data-changed": String(st.changed), "data-shift": st.shift_s === null ? null : st.shift_s, class: st.changed ? "changed" : "" },
          h("td", { class: "state", text: stateLabel(st.status) }),
          h("td", { class: "was", title: st.was || "", text: st.was ? clock(st.was) : "did not fire" }),
          h("td", { class: "would-be", title: st.would_be || "", text: st.would_be ? clock(st.would_be) : "would not fire" }),
          h("td", { class: "shift", text: shiftText(st) }),
        ),
      );
      body.push(table(["status", "was", "would be", "change"], rows, "No geofence status fired or would fire."));
      body.push(h("p", { class: "muted", text: `${replay.fixes} fixes replayed, ${replay.changed ? "some statuses change" : "nothing changes"}.` }));
    }
    body.push(overrideForm(id, tuned));
    return card(title, { wide: true, id: "replay" }, body);
  }

  function shiftText(st) {
    if (!st.changed) return "same";
    if (st.was === null) return "would newly fire";
    if (st.would_be === null) return "would not fire";
    return (st.shift_s > 0 ? "+" : "−") + duration(Math.abs(st.shift_s)) + (st.shift_s > 0 ? " later" : " earlier");
  }

  const OVERRIDE_KEYS = ["approach_m", "radius_m", "dwell_s", "min_fixes", "depart_after_s", "exit_factor", "dropoff_radius_m", "dropoff_dwell_s", "auto_dropoff", "max_accuracy_m", "max_speed_mps"];

  function overrideForm(id, tuned) {
    const key = h("select", { id: "override-key" }, OVERRIDE_KEYS.map((k) => h("option", { value: OVERRIDE_PREFIX + k, text: OVERRIDE_PREFIX + k })));
    const value = h("input", { id: "override-value", size: 8, required: true, placeholder: "value" });
    const form = h(
      "form",
      { class: "override", id: "override-form" },
      key, " = ", value, " ",
      h("button", { type: "submit", class: "btn", text: "Replay" }),
      tuned.length ? h("a", { href: "#/orders/" + encodeURIComponent(id), text: "back to the settings as they are" }) : "",
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const params = new URLSearchParams(tuned);
      params.set(key.value, value.value.trim());
      document.activeElement.blur();
      location.hash = "#/orders/" + encodeURIComponent(id) + "?" + params;
    });
    return form;
  }

  function legend(track, replay) {
    const fixes = track.points.length + " fixes" + (track.truncated ? " (the latest)" : "");
    const whatIf = replay && replay.statuses
      ? h("span", {}, h("span", { class: "swatch would-be" }), "where a status would fire with the overrides")
      : "";
    return h(
      "div",
      { class: "legend" },
      h("span", {}, h("span", { class: "swatch pickup" }), "pickup: radius, and exit radius (dashed)"),
      h("span", {}, h("span", { class: "swatch dropoff" }), "dropoff"),
      h("span", {}, h("span", { class: "swatch route" }), "courier's track, " + fixes),
      h("span", {}, h("span", { class: "swatch marker" }), "where a status fired"),
      whatIf,
    );
  }

  // A local equirectangular projection in metres: x east, y south (SVG's y runs down).
  function drawTrack(track, replay) {
    const places = [["pickup", track.pickup], ["dropoff", track.dropoff]].filter(([, p]) => p);
    const marks = track.transitions.filter((t) => t.lat !== null && t.lng !== null);
    // Where a status would fire with the overrides, where that differs from where it did.
    const wouldBe = ((replay && replay.statuses) || []).filter((st) => st.would_be_at && st.changed);
    const spots = [...marks, ...wouldBe.map((st) => st.would_be_at)];
    const lats = [...track.points.map((p) => p.lat), ...places.map(([, p]) => p.lat), ...spots.map((t) => t.lat)];
    const lngs = [...track.points.map((p) => p.lng), ...places.map(([, p]) => p.lng), ...spots.map((t) => t.lng)];
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
    for (const t of spots) grow(...xy(t.lat, t.lng), 0);
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
    wouldBe.forEach((st, i) => {
      const [x, y] = xy(st.would_be_at.lat, st.would_be_at.lng);
      const r = unit * 1.5;
      if (st.was_at) {
        const [wx, wy] = xy(st.was_at.lat, st.was_at.lng);
        svg.append(s("line", { class: "would-be-shift", x1: wx, y1: wy, x2: x, y2: y, "vector-effect": "non-scaling-stroke" }));
      }
      svg.append(
        s("rect", { class: "would-be-marker", x: x - r, y: y - r, width: 2 * r, height: 2 * r, transform: `rotate(45 ${x} ${y})`, "vector-effect": "non-scaling-stroke", "data-status": st.status },
          s("title", { text: `${st.status} would fire at ${clock(st.would_be)} (${shiftText(st)})` })),
        s("text", { class: "would-be-label", x: x - unit * 1.8, y: y - unit * (1.6 + 3.4 * (i % 2)), "text-anchor": "end", "font-size": unit * 2.8, text: "would: " + stateLabel(st.status) }),
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

  // -- the stores' learned pickup points --------------------------------------------

  async function storesView(params) {
    const min = params.get("min_orders");
    const query = min === null ? "" : "?" + new URLSearchParams({ min_orders: min });
    const d = await api("/v1/stores/suggestions" + query);
    const rows = d.stores.map((st) =>
      h(
        "tr",
        { "data-store-id": st.merchant_supplied_id },
        h("td", { class: "mono", text: st.merchant_supplied_id }),
        h("td", { class: "mono registered", text: `${st.registered.lat.toFixed(6)}, ${st.registered.lng.toFixed(6)}` + (st.registered.radius_m === null ? "" : ` (${Math.round(st.registered.radius_m)} m)`) }),
        h("td", { class: "mono suggested", text: `${st.lat.toFixed(6)}, ${st.lng.toFixed(6)} (${Math.round(st.radius_m)} m)` }),
        h("td", { class: "moved", "data-moved-m": st.moved_m, text: Math.round(st.moved_m) + " m" }),
        h("td", { class: "visits", text: st.visits }),
      ),
    );
    const need = min === null ? 3 : min;
    return [
      backLink(),
      h("div", { class: "order-head" }, h("h1", {}, "Stores: where couriers wait")),
      h(
        "p",
        { class: "muted" },
        "Learned from couriers' fixes between arrived_at_store and dasher_out_for_delivery, as ",
        h("code", { text: "courierd stores suggest" }),
        ` does; stores with fewer than ${need} stays are left out (`,
        h("code", { text: "?min_orders=N" }),
        " in the address for another number). Check a point with ",
        h("code", { text: "courierd replay" }),
        " after ",
        h("code", { text: "courierd stores import" }),
        ". Computed at most every 5 minutes; reload the page for a newer reading.",
      ),
      h(
        "div",
        { class: "grid" },
        card(`Suggested pickup points: ${d.stores.length}`, { wide: true, id: "stores" }, table(["store", "registered", "suggested", "moved", "stays"], rows, "No store has enough stays yet.")),
        // Drawn: the ones that moved furthest (those deserve a look first).
        [...d.stores]
          .sort((a, b) => b.moved_m - a.moved_m)
          .slice(0, STORE_DRAWINGS)
          .map((st) => card(`${st.merchant_supplied_id}: moved ${Math.round(st.moved_m)} m`, { id: "store-" + st.merchant_supplied_id }, drawStore(st))),
      ),
    ];
  }

  function drawStore(st) {
    const reg = st.registered;
    const regR = reg.radius_m === null ? 0 : reg.radius_m;
    const lat0 = (reg.lat + st.lat) / 2;
    const lng0 = (reg.lng + st.lng) / 2;
    const k = Math.cos((lat0 * Math.PI) / 180);
    const xy = (lat, lng) => [(lng - lng0) * k * M_PER_DEG, -(lat - lat0) * M_PER_DEG];
    const [rx, ry] = xy(reg.lat, reg.lng);
    const [sx, sy] = xy(st.lat, st.lng);
    const half = Math.max(Math.abs(rx) + regR, Math.abs(ry) + regR, Math.abs(sx) + st.radius_m, Math.abs(sy) + st.radius_m, 40) * 1.15;
    const unit = half / 50;
    const svg = s("svg", {
      class: "map store-map",
      viewBox: [-half, -half, 2 * half, 2 * half].map((v) => v.toFixed(1)).join(" "),
      role: "img",
      "aria-label": "the registered pickup point and the suggested one",
    });
    if (regR) svg.append(s("circle", { class: "place radius pickup", cx: rx, cy: ry, r: regR, "vector-effect": "non-scaling-stroke" }));
    svg.append(
      s("circle", { class: "suggested-radius", cx: sx, cy: sy, r: st.radius_m, "vector-effect": "non-scaling-stroke" }),
      s("line", { class: "would-be-shift", x1: rx, y1: ry, x2: sx, y2: sy, "vector-effect": "non-scaling-stroke" }),
      s("circle", { class: "status-marker registered-point", cx: rx, cy: ry, r: unit * 1.6, "vector-effect": "non-scaling-stroke", "data-point": "registered" },
        s("title", { text: "registered point" })),
      s("circle", { class: "suggested-point", cx: sx, cy: sy, r: unit * 1.6, "vector-effect": "non-scaling-stroke", "data-point": "suggested" },
        s("title", { text: `suggested point, from ${st.visits} stays` })),
      s("text", { x: rx, y: ry + unit * 6, "text-anchor": "middle", "font-size": unit * 4, text: "registered" }),
      s("text", { x: sx, y: sy - unit * 4, "text-anchor": "middle", "font-size": unit * 4, text: `suggested (${Math.round(st.moved_m)} m)` }),
    );
    svg.append(scaleBar(-half, half, 2 * half, unit));
    return svg;
  }

  pollHealth();
  refresh();
})();
