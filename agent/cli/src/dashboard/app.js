// nodemesh dashboard: plain JS, no libraries. Pages by URL hash:
//   #/                      namespaces
//   #/ns/NS                 workloads of a namespace (with sparklines)
//   #/w/NS/KIND/NAME        one workload: peers, edges graph, top paths, TLS
//   #/tap?workload=&namespace=&path=   live requests
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pct = (v) => (v == null ? "-" : (v * 100).toFixed(2) + "%");
const ms = (v) => (v == null ? "-" : v + "ms");
const rate = (v) => (v == null ? "-" : v.toFixed(1) + "rps");

let tapSince = 0;
let tapEvents = [];

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

// Golden numbers from merged histogram buckets (never averaged percentiles).
function golden() {
  return { requests: 0, successes: 0, tls: 0, latency: [] };
}
function add(g, o) {
  g.requests += o.requests; g.successes += o.successes; g.tls += o.tls;
  o.latency.forEach((n, i) => { g.latency[i] = (g.latency[i] || 0) + n; });
}
function quantile(g, q, bounds) {
  const total = g.latency.reduce((a, b) => a + (b || 0), 0);
  if (!total) return null;
  const rank = Math.max(1, Math.ceil(q * total));
  let seen = 0;
  for (let i = 0; i < g.latency.length; i++) {
    seen += g.latency[i] || 0;
    if (seen >= rank) return bounds[Math.min(i, bounds.length - 1)];
  }
  return null;
}

// Served (inbound) numbers per workload, TCP per workload.
function workloads(report) {
  const by = new Map();
  const key = (w) => w.namespace + "/" + w.kind + "/" + w.name;
  const entry = (w) => {
    const k = key(w);
    if (!by.has(k)) by.set(k, { ns: w.namespace, kind: w.kind, name: w.name, g: golden(), pods: 0, open: 0, sent: 0, received: 0 });
    return by.get(k);
  };
  for (const r of report.requests) if (r.key.direction === "inbound") add(entry(r.key.workload).g, r.golden);
  for (const t of report.tcp) {
    if (t.direction !== "inbound") continue;
    const e = entry(t.workload);
    e.pods += t.pods; e.open += t.tcp.open; e.sent += t.tcp.sent_bytes; e.received += t.tcp.received_bytes;
  }
  return [...by.values()].sort((a, b) => (a.ns + a.name).localeCompare(b.ns + b.name));
}

function line(w, report) {
  const g = w.g, n = g.requests, win = report.window_secs || 1;
  return {
    success: n ? g.successes / n : null,
    rps: n ? n / win : null,
    p50: quantile(g, 0.5, report.latency_bounds_ms),
    p95: quantile(g, 0.95, report.latency_bounds_ms),
    p99: quantile(g, 0.99, report.latency_bounds_ms),
    tls: n ? g.tls / n : null,
  };
}

function spark(points) {
  if (!points || !points.length) return '<span class="muted">-</span>';
  // One sample so far: a level line.
  if (points.length === 1) points = [points[0], points[0]];
  const w = 120, h = 24, max = Math.max(...points.map((p) => p[1]), 0.001);
  const xs = points.map((p, i) => [points.length === 1 ? w : (i * w) / (points.length - 1), h - (p[1] / max) * (h - 2) - 1]);
  const d = xs.map(([x, y], i) => (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1)).join(" ");
  return `<svg class="spark" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}"><path d="${d}" fill="none" stroke="#2f6fde" stroke-width="1.5"/>` +
    xs.map(([x, y]) => `<circle cx="${x}" cy="${y}" r="1.5" fill="#2f6fde"/>`).join("") + "</svg>";
}

function showErrors(errors) {
  $("#errors").innerHTML = (errors || []).map((e) =>
    `<div>agent ${esc(e.agent)} is unreachable: ${esc(e.error)} — its node's numbers are missing.</div>`).join("");
}

async function overview(win) {
  const { report, errors } = await getJSON("/api/stat?window=" + win);
  showErrors(errors);
  const byNs = new Map();
  for (const w of workloads(report)) {
    if (!byNs.has(w.ns)) byNs.set(w.ns, { g: golden(), pods: 0 });
    const e = byNs.get(w.ns); add(e.g, w.g); e.pods += w.pods;
  }
  const rows = [...byNs.entries()].map(([ns, e]) => {
    const l = line({ g: e.g }, report);
    return `<tr data-namespace="${esc(ns)}"><td><a href="#/ns/${esc(ns)}">${esc(ns)}</a></td><td class="num meshed">${e.pods}</td>` +
      `<td class="num success">${pct(l.success)}</td><td class="num rps">${rate(l.rps)}</td><td class="num p99">${ms(l.p99)}</td></tr>`;
  });
  return `<h1>Namespaces</h1><table><tr><th>NAMESPACE</th><th>MESHED PODS</th><th>SUCCESS</th><th>RPS</th><th>P99</th></tr>${rows.join("") || '<tr><td colspan="5" class="muted">no meshed workload has been seen yet</td></tr>'}</table>`;
}

async function namespace(ns, win) {
  const [{ report, errors }, history] = await Promise.all([getJSON("/api/stat?window=" + win), getJSON("/api/history")]);
  showErrors(errors);
  const rows = workloads(report).filter((w) => w.ns === ns).map((w) => {
    const l = line(w, report);
    const href = `#/w/${encodeURIComponent(w.ns)}/${encodeURIComponent(w.kind)}/${encodeURIComponent(w.name)}`;
    return `<tr data-workload="${esc(w.name)}"><td><a href="${href}">${esc(w.name)}</a></td><td>${esc(w.kind)}</td>` +
      `<td class="num meshed">${w.pods}</td><td class="num success">${pct(l.success)}</td><td class="num rps">${rate(l.rps)}</td>` +
      `<td class="num p50">${ms(l.p50)}</td><td class="num p95">${ms(l.p95)}</td><td class="num p99">${ms(l.p99)}</td>` +
      `<td class="num tcp">${w.open}</td><td>${spark(history[w.ns + "/" + w.kind + "/" + w.name])}</td></tr>`;
  });
  return `<h1>Namespace ${esc(ns)}</h1><table><tr><th>WORKLOAD</th><th>KIND</th><th>MESHED</th><th>SUCCESS</th><th>RPS</th><th>P50</th><th>P95</th><th>P99</th><th>TCP_CONN</th><th>RPS, LAST 10 MIN</th></tr>${rows.join("") || '<tr><td colspan="10" class="muted">nothing seen in this namespace</td></tr>'}</table>`;
}

function graph(name, inbound, outbound) {
  const h = Math.max(inbound.length, outbound.length, 1) * 40 + 20, cx = 300, cy = h / 2;
  const node = (x, y, label, cls) => `<g class="${cls}"><rect x="${x - 80}" y="${y - 13}" width="160" height="26" rx="5" fill="#fff" stroke="#2f6fde"/><text x="${x}" y="${y + 5}" text-anchor="middle" font-size="12">${esc(label)}</text></g>`;
  const edges = [];
  inbound.forEach((p, i) => { const y = 30 + i * 40; edges.push(`<line x1="180" y1="${y}" x2="${cx - 80}" y2="${cy}" stroke="${p.tls ? "#17803d" : "#c0262d"}"/>` + node(100, y, p.label, "peer in")); });
  outbound.forEach((p, i) => { const y = 30 + i * 40; edges.push(`<line x1="${cx + 80}" y1="${cy}" x2="420" y2="${y}" stroke="${p.tls ? "#17803d" : "#7a8394"}"/>` + node(500, y, p.label, "peer out")); });
  return `<svg width="600" height="${h}">${edges.join("")}${node(cx, cy, name, "self")}</svg>`;
}

async function workload(ns, kind, name, win) {
  const [{ report, errors }, tap] = await Promise.all([getJSON("/api/stat?window=" + win), pollTap({ namespace: ns, workload: name })]);
  showErrors(errors);
  const self = workloads(report).find((w) => w.ns === ns && w.kind === kind && w.name === name);
  const l = self ? line(self, report) : {};
  const peersIn = new Map(), peersOut = new Map();
  for (const r of report.requests) {
    const w = r.key.workload;
    if (w.namespace !== ns || w.name !== name) continue;
    if (r.key.direction === "inbound") {
      const k = r.key.peer_identity || "(not meshed)";
      if (!peersIn.has(k)) peersIn.set(k, golden()); add(peersIn.get(k), r.golden);
    } else {
      const p = r.key.peer, k = p.name ? p.namespace + "/" + p.name : "(outside the mesh)";
      if (!peersOut.has(k)) peersOut.set(k, golden()); add(peersOut.get(k), r.golden);
    }
  }
  const table = (m, head) => `<table><tr><th>${head}</th><th>REQUESTS</th><th>SUCCESS</th><th>P99</th><th>mTLS</th></tr>` +
    ([...m.entries()].map(([k, g]) => `<tr><td>${esc(k)}</td><td class="num">${g.requests}</td><td class="num">${pct(g.successes / g.requests)}</td><td class="num">${ms(quantile(g, 0.99, report.latency_bounds_ms))}</td><td class="num">${pct(g.tls / g.requests)}</td></tr>`).join("") || '<tr><td colspan="5" class="muted">none</td></tr>') + "</table>";
  // Top paths from the live requests this page has seen.
  const paths = new Map();
  for (const e of tapEvents) {
    // Its own side of each request: calls it served, calls it made (a
    // request across nodes is seen by both agents: counted once).
    const mine = e.direction === "inbound" ? e.dst.workload.split("/").pop() === name : e.src.workload.split("/").pop() === name;
    if (e.kind !== "rsp" || !mine) continue;
    const k = e.method + " " + e.path;
    if (!paths.has(k)) paths.set(k, { count: 0, ok: 0, best: Infinity, worst: 0 });
    const p = paths.get(k); p.count++; if (e.status < 500) p.ok++;
    p.best = Math.min(p.best, e.latency_us); p.worst = Math.max(p.worst, e.latency_us);
  }
  const top = [...paths.entries()].sort((a, b) => b[1].count - a[1].count).slice(0, 10).map(([k, p]) =>
    `<tr><td>${esc(k)}</td><td class="num">${p.count}</td><td class="num">${pct(p.ok / p.count)}</td><td class="num">${p.best}µs</td><td class="num">${p.worst}µs</td></tr>`).join("");
  const tlsState = l.tls == null ? "no requests yet" : l.tls === 1 ? "every request over mutual TLS" : l.tls === 0 ? "no request over mutual TLS (node-local or plaintext)" : pct(l.tls) + " over mutual TLS";
  return `<h1>${esc(kind)} ${esc(ns)}/${esc(name)}</h1>` +
    `<p data-workload="${esc(name)}">success <b class="success">${pct(l.success)}</b> · <span class="rps">${rate(l.rps)}</span> · p50 ${ms(l.p50)} · p95 ${ms(l.p95)} · p99 <span class="p99">${ms(l.p99)}</span> · TLS: <span class="tls">${esc(tlsState)}</span></p>` +
    `<h2>Edges</h2>` + graph(name,
      [...peersIn.entries()].map(([k, g]) => ({ label: k.replace(/^spiffe:\/\/[^/]+\/ns\//, "").replace("/sa/", "/sa:"), tls: g.tls === g.requests })),
      [...peersOut.entries()].map(([k, g]) => ({ label: k, tls: g.tls === g.requests }))) +
    `<h2>Inbound (who calls it)</h2>` + table(peersIn, "CLIENT") +
    `<h2>Outbound (what it calls)</h2>` + table(peersOut, "DESTINATION") +
    `<h2>Top paths (live)</h2><table><tr><th>PATH</th><th>COUNT</th><th>SUCCESS</th><th>BEST</th><th>WORST</th></tr>${top || '<tr><td colspan="5" class="muted">no request seen since this page opened</td></tr>'}</table>`;
}

async function pollTap(filter) {
  const q = new URLSearchParams({ since: String(tapSince) });
  for (const [k, v] of Object.entries(filter)) if (v) q.set(k, v);
  const answer = await getJSON("/api/tap?" + q);
  tapSince = answer.next;
  tapEvents = tapEvents.concat(answer.events).slice(-500);
  showErrors(answer.errors);
  return answer;
}

async function tapPage(params) {
  const filter = { namespace: params.get("namespace") || "", workload: params.get("workload") || "", path: params.get("path") || "" };
  await pollTap(filter);
  const rows = tapEvents.slice().reverse().map((e) => {
    const what = e.kind === "req" ? `${esc(e.method)} ${esc(e.authority)}${esc(e.path)}` :
      e.kind === "rsp" ? `:status=${e.status} latency=${e.latency_us}µs` :
      e.kind === "end" ? `duration=${e.duration_us}µs response-length=${e.response_bytes}B` : esc(e.kind);
    return `<tr data-kind="${esc(e.kind)}"><td>${esc(e.kind)}</td><td>${e.direction === "inbound" ? "in" : "out"}</td>` +
      `<td>${esc(e.src.namespace)}/${esc(e.src.pod)}</td><td>${esc(e.dst.namespace)}/${esc(e.dst.pod)}</td><td>${e.tls}</td><td class="path">${what}</td>` +
      `<td>${esc(e.src.identity || "-")}</td><td>${esc(e.dst.identity || "-")}</td></tr>`;
  });
  return `<h1>Live requests</h1><form id="tapform">namespace <input name="namespace" value="${esc(filter.namespace)}"> workload <input name="workload" value="${esc(filter.workload)}"> path prefix <input name="path" value="${esc(filter.path)}"><button>Filter</button></form>` +
    `<table class="tap"><tr><th>EVENT</th><th>PROXY</th><th>SRC</th><th>DST</th><th>TLS</th><th>REQUEST / RESPONSE</th><th>SRC_ID</th><th>DST_ID</th></tr>${rows.join("") || '<tr><td colspan="8" class="muted">waiting for requests…</td></tr>'}</table>`;
}

let lastRoute = "";
async function render() {
  const hash = location.hash || "#/";
  const win = $("#window").value;
  const [path, qs] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (hash !== lastRoute) { tapEvents = []; tapSince = 0; lastRoute = hash; }
  let html;
  try {
    if (parts[0] === "ns" && parts[1]) html = await namespace(parts[1], win);
    else if (parts[0] === "w" && parts.length === 4) html = await workload(parts[1], parts[2], parts[3], win);
    else if (parts[0] === "tap") html = await tapPage(new URLSearchParams(qs || ""));
    else html = await overview(win);
  } catch (e) {
    html = `<p class="bad">The dashboard's process did not answer: ${esc(e.message)}</p>`;
  }
  const focused = document.activeElement && document.activeElement.form ? document.activeElement.name : null;
  $("#page").innerHTML = html;
  const form = $("#tapform");
  if (form) {
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams(new FormData(form));
      location.hash = "#/tap?" + q;
    };
    if (focused) form.elements[focused].focus();
  }
}

window.addEventListener("hashchange", render);
$("#window").addEventListener("change", render);
(async function loop() { await render(); setTimeout(loop, 2000); })();
