// The status page's script: polls /api/v1/status, follows /api/v1/points/stream (server-sent
// events read through fetch, so an access token can go in a header), and renders both; while
// the operator has it started, the traffic monitor follows /api/v1/buses/{bus}/traffic.
// No libraries: the page must work on a plant network without internet.
"use strict";

const $ = (sel) => document.querySelector(sel);

// An access token given as #token=... is kept for this tab only and taken out of the URL.
(function keepToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("m2m-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function headers() {
  const t = sessionStorage.getItem("m2m-token");
  return t ? { Authorization: "Bearer " + t } : {};
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function fmtAge(s) {
  if (s == null) return "never";
  if (s < 1) return "now";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function fmtValue(v) {
  if (v == null) return "–";
  if (typeof v === "number" && !Number.isInteger(v)) return String(Math.round(v * 1000) / 1000);
  return String(v);
}

function renderStatus(s) {
  const g = s.gateway;
  $("#gw-name").textContent = g.name;
  document.title = g.name + " – m2m-gateway";
  const h = $("#health");
  h.textContent = g.health;
  h.className = "badge " + g.health;
  $("#version").textContent = g.version;
  const devices = s.buses.reduce((n, b) => n + b.devices.length, 0);
  const count = (n, one, many = one + "s") => `${n} ${n === 1 ? one : many}`;
  $("#summary").textContent = [`up ${fmtAge(g.uptime_seconds)}`, count(s.buses.length, "bus", "buses"),
    count(devices, "device"), count(g.points, "point"), count(s.peers.length, "peer")].join(" · ");
  $("#problems").replaceChildren(...g.problems.map((p) => el("li", {}, p)));

  $("#buses").replaceChildren(...s.buses.map((b) => {
    const load = Math.round(b.load_ratio * 1000) / 10;
    const bar = el("div", { class: "bar" }, el("div", { style: `width:${Math.min(100, load)}%` }));
    const devs = el("ul", {}, ...b.devices.map((d) => el("li", { "data-device": d.name },
      el("span", {}, `${d.name} (unit ${d.unit})`),
      el("span", {}, el("span", { class: "state " + (d.state === "up" ? "ok" : "bad") }, d.state),
        " ", el("span", { class: "muted" }, fmtAge(d.last_answer_age_seconds))))));
    return el("div", { class: "card", "data-bus": b.name },
      el("h3", {}, el("span", {}, b.name), el("span", { class: "muted" }, `${load}% busy`)),
      bar,
      el("div", { class: "muted" }, `${b.port} · ${b.protocol}`),
      el("div", {}, `${b.transactions} transactions · ${b.timeouts} timeouts · ${b.crc_errors} CRC · ${b.framing_errors} framing · ${b.late_replies} late · ${b.exceptions} exceptions · ${b.queued} queued`),
      devs);
  }));

  const show = (id, rows) => { $(id + "-section").hidden = rows.length === 0; $(id + " tbody").replaceChildren(...rows); };
  show("#peers", s.peers.map((p) => el("tr", { "data-peer": p.name },
    el("td", {}, p.name),
    el("td", {}, el("span", { class: "state " + (p.connected ? "ok" : "bad") }, p.connected ? "up" : "down")),
    el("td", {}, `${p.spool_pending_batches} batches, ${p.spool_pending_values} values, ${fmtBytes(p.spool_pending_bytes)}`),
    el("td", {}, p.spool_oldest_age_seconds == null ? "–" : fmtAge(p.spool_oldest_age_seconds)),
    el("td", {}, fmtAge(p.last_ack_age_seconds)),
    el("td", {}, `${p.batches_sent} / ${p.batches_acked}`),
    el("td", { class: "relay" }, `${p.values_relayed} relayed · ${p.loop_refused} loops cut · ${p.relayed_refused} refused`))));
  show("#plcs", s.plcs.map((p) => el("tr", { "data-plc": p.name },
    el("td", {}, p.name),
    el("td", {}, el("span", { class: "state " + (p.connected ? "ok" : "bad") }, p.connected ? "up" : "down")),
    el("td", {}, p.values_written), el("td", {}, p.values_dropped), el("td", {}, p.spool_pending_batches + " batches"))));
  show("#tunnels", s.tunnels.map((t) => el("tr", {},
    el("td", {}, t.name),
    el("td", {}, el("span", { class: "state " + (t.port_open ? "ok" : "bad") }, t.port_open ? "open" : "closed")),
    el("td", {}, fmtBytes(t.sent_bytes)), el("td", {}, fmtBytes(t.received_bytes)), el("td", {}, fmtBytes(t.dropped_bytes)))));
  busOptions(s.buses.map((b) => b.name));
  $("#server-section").hidden = !s.server;
  if (s.server) {
    $("#server").textContent = `listening on ${s.server.listen} · ${s.server.connections} masters connected · ${s.server.requests} requests · ${s.server.exceptions} exceptions`;
  }
}

// The stream carries changes only; a value read again unchanged gets younger, so the ages
// are refreshed from the point list along with the status.
async function refreshAges() {
  const g = glob();
  const r = await fetch("/api/v1/points" + (g ? "?glob=" + encodeURIComponent(g) : ""), { headers: headers() });
  if (!r.ok) return;
  const now = performance.now();
  for (const p of await r.json()) {
    const known = points.get(p.name);
    if (!known) continue;
    if (known.view.quality === p.quality && JSON.stringify(known.view.value) === JSON.stringify(p.value)) {
      known.view = p;
      known.received = now;
    } else {
      upsert(p, true);
    }
  }
  tickAges();
}

async function pollStatus() {
  try {
    const r = await fetch("/api/v1/status", { headers: headers() });
    if (!r.ok) throw new Error((await r.json()).error || r.statusText);
    renderStatus(await r.json());
    await refreshAges();
  } catch (e) {
    const h = $("#health");
    h.textContent = "unreachable";
    h.className = "badge degraded";
    $("#problems").replaceChildren(el("li", {}, "cannot read the gateway's status: " + e.message));
  }
  setTimeout(pollStatus, 2000);
}

// Point table: name -> { view, received (ms), row }.
const points = new Map();

function pointRow(p) {
  return el("tr", { "data-point": p.name, class: "q-" + p.quality },
    el("td", { class: "name", title: p.origin }, p.name),
    el("td", { class: "num value" }, fmtValue(p.value)),
    el("td", { class: "unit" }, p.unit || ""),
    el("td", { class: "quality" }, p.quality === "exception" ? p.exception : p.quality.replace("_", " ")),
    el("td", { class: "num age" }, fmtAge(p.age_seconds)));
}

function upsert(p, flash) {
  const now = performance.now();
  const old = points.get(p.name);
  const row = pointRow(p);
  if (flash) row.classList.add("flash");
  if (old) old.row.replaceWith(row); else insertSorted(p.name, row);
  points.set(p.name, { view: p, received: now, row });
  if (flash) setTimeout(() => row.classList.remove("flash"), 600);
}

function insertSorted(name, row) {
  const body = $("#points tbody");
  for (const r of body.rows) {
    if (r.dataset.point > name) { body.insertBefore(row, r); return; }
  }
  body.append(row);
}

function tickAges() {
  const now = performance.now();
  for (const { view, received, row } of points.values()) {
    row.querySelector(".age").textContent = fmtAge(view.age_seconds + (now - received) / 1000);
  }
}

// Reads server-sent events from a fetch body; calls onEvent(type, data) per event.
async function readEvents(url, onEvent, signal) {
  const r = await fetch(url, { headers: headers(), signal });
  if (!r.ok) throw new Error((await r.json()).error || r.statusText);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let type = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
      }
      if (data) onEvent(type, JSON.parse(data));
    }
  }
}

let pointsAbort = null;

function glob() {
  const f = $("#filter").value.trim();
  if (!f) return "";
  return /[*?[]/.test(f) ? f : "*" + f + "*";
}

async function followPoints() {
  if (pointsAbort) pointsAbort.abort();
  const abort = new AbortController();
  pointsAbort = abort;
  const g = glob();
  const url = "/api/v1/points/stream" + (g ? "?glob=" + encodeURIComponent(g) : "");
  try {
    await readEvents(url, (type, list) => {
      if (type === "snapshot") {
        points.clear();
        $("#points tbody").replaceChildren();
        for (const p of list) upsert(p, false);
      } else if (type === "change") {
        for (const p of list) upsert(p, true);
      }
      $("#points-note").textContent = points.size ? "" : "no point has a value yet";
    }, abort.signal);
  } catch (e) {
    if (abort.signal.aborted) return;
    $("#points-note").textContent = "live values interrupted: " + e.message + "; retrying";
  }
  if (!abort.signal.aborted) setTimeout(followPoints, 2000);
}

let filterTimer = null;
$("#filter").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(followPoints, 300);
});

// Traffic monitor: one bus at a time, only while started (the bus builds trace events only
// while someone follows them), newest frame first, the last TRAFFIC_ROWS kept.
const TRAFFIC_ROWS = 200;
let trafficAbort = null;

function busOptions(names) {
  const sel = $("#traffic-bus");
  const have = [...sel.options].map((o) => o.value);
  if (JSON.stringify(have) === JSON.stringify(names)) return;
  const chosen = sel.value;
  sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(chosen)) sel.value = chosen;
  $("#traffic-section").hidden = names.length === 0;
}

function trafficRow(f) {
  const hex = (f.bytes.match(/../g) || []).join(" ");
  const time = f.at.includes("T") ? f.at.split("T")[1].replace("Z", "") : f.at;
  return el("tr", { class: "v-" + f.verdict, "data-verdict": f.verdict, "data-dir": f.dir },
    el("td", {}, time), el("td", {}, f.dir), el("td", { class: "bytes" }, hex || "(no bytes)"),
    el("td", {}, f.summary), el("td", { class: "verdict" }, f.verdict.replace(/_/g, " ")));
}

function addTraffic(row) {
  const body = $("#traffic tbody");
  body.prepend(row);
  while (body.rows.length > TRAFFIC_ROWS) body.deleteRow(-1);
}

function stopTraffic(note) {
  if (trafficAbort) trafficAbort.abort();
  trafficAbort = null;
  $("#traffic-toggle").textContent = "Start";
  $("#traffic-bus").disabled = false;
  if (note) $("#traffic-note").textContent = note;
}

async function startTraffic() {
  const bus = $("#traffic-bus").value;
  if (!bus) return;
  const abort = new AbortController();
  trafficAbort = abort;
  $("#traffic-toggle").textContent = "Stop";
  $("#traffic-bus").disabled = true;
  $("#traffic").dataset.bus = bus;
  $("#traffic tbody").replaceChildren();
  $("#traffic-note").textContent = `following bus ${bus}`;
  try {
    await readEvents("/api/v1/buses/" + encodeURIComponent(bus) + "/traffic", (type, data) => {
      if (type === "frame") addTraffic(trafficRow(data));
      else if (type === "lagged") {
        addTraffic(el("tr", { class: "lagged" }, el("td", { colspan: "5" }, `${data.missed} frames missed: this page read too slowly`)));
      }
    }, abort.signal);
    if (!abort.signal.aborted) stopTraffic(`the gateway ended the traffic stream of bus ${bus}`);
  } catch (e) {
    if (!abort.signal.aborted) stopTraffic(`traffic of bus ${bus} interrupted: ${e.message}`);
  }
}

$("#traffic-toggle").addEventListener("click", () => {
  if (trafficAbort) stopTraffic(`stopped; ${$("#traffic tbody").rows.length} frames kept`);
  else startTraffic();
});

pollStatus();
followPoints();
setInterval(tickAges, 1000);
