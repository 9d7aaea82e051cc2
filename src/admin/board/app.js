// The board: renders each snapshot from /board/events (server-sent events, one a second).
// Everything is built with DOM calls and textContent: nothing from the server is read as HTML.
"use strict";

const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
};
const svgEl = (tag, attrs = {}) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};
const num = (n) => (n ?? 0).toLocaleString("en");
const age = (s) => (s < 90 ? `${s}s` : s < 5400 ? `${Math.round(s / 60)}m` : `${Math.round(s / 3600)}h`);
const time = (ms) => new Date(ms).toLocaleTimeString();

// Thirty minutes always, the older ones 0 until the relay has run that long.
const thirty = (a) => Array(Math.max(0, 30 - a.length)).fill(0).concat(a.slice(-30));

function spark(inputs, outputs) {
  inputs = thirty(inputs);
  outputs = thirty(outputs);
  const w = 300, h = 36, n = inputs.length;
  const max = Math.max(1, ...inputs, ...outputs);
  const line = (values) => values.map((v, i) => `${(i * w) / (n - 1)},${h - 2 - (v / max) * (h - 4)}`).join(" ");
  const svg = svgEl("svg", { class: "spark", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  svg.append(svgEl("polyline", { class: "in", points: line(inputs) }));
  svg.append(svgEl("polyline", { class: "out", points: line(outputs) }));
  return svg;
}

function figure(value, label, name) {
  return el("div", {}, el("b", { class: name }, num(value)), el("span", {}, label));
}

function motionCard(name, m) {
  const state = m.failing ? "failing" : m.depth > 0 ? "waiting" : "ok";
  const card = el("section", { class: `motion ${state}`, id: `motion-${name}`, "data-failing": String(m.failing) });
  card.append(el("h2", {}, el("span", {}, name), el("span", { class: "state" }, m.failing ? "FAILING" : state === "waiting" ? "waiting" : "ok")));
  const per = (a) => a[a.length - 1] ?? 0;
  card.append(el("div", { class: "numbers" },
    figure(m.received, "received", "received"),
    figure(m.delivered, "delivered", "delivered"),
    figure(m.depth, `waiting (oldest ${age(m.oldest_age_seconds)})`, "depth"),
    figure(m.dead_letters, "dead letters", "dead"),
    figure(per(m.in_per_minute), "in this minute", "in-minute"),
    figure(per(m.out_per_minute), "out this minute", "out-minute"),
    figure(m.rate_limited, "rate limited", "rate-limited"),
    figure(m.windows_open, "24-hour windows open", "windows"),
    figure(m.outbound["2xx"], "sends 2xx", "out-2xx"),
    figure(m.outbound["4xx"], "sends 4xx", "out-4xx"),
    figure(m.outbound["5xx"], "sends 5xx", "out-5xx"),
    figure(m.retries, "retries", "retries")));
  card.append(spark(m.in_per_minute, m.out_per_minute));
  card.append(el("div", { class: "legend" }, el("span", { class: "i" }, "— in"), " / ", el("span", { class: "o" }, "— out"), " per minute, last 30 minutes"));
  if (m.failing) {
    card.append(el("div", { class: "errors" }, `failing since ${time(m.failing_since_unix_ms)}`));
  }
  if (m.last_errors.length) {
    const list = el("ul", { class: "errors" });
    for (const e of m.last_errors.slice().reverse()) {
      list.append(el("li", {}, `${time(e.at_unix_ms)} `, el("code", {}, e.delivery_id), ` ${e.reason}`));
    }
    card.append(list);
  }
  const table = el("table", {}, el("tr", {}, el("th", {}, "account"), el("th", {}, "provider"), el("th", {}, "received"), el("th", {}, "waiting"), el("th", {}, "oldest"), el("th", {}, "windows")));
  for (const [id, a] of Object.entries(m.accounts)) {
    table.append(el("tr", {}, el("td", {}, id), el("td", {}, a.provider), el("td", {}, num(a.received)), el("td", {}, num(a.depth)), el("td", {}, a.depth ? age(a.oldest_age_seconds) : "–"), el("td", {}, num(a.windows_open))));
  }
  card.append(table);
  return card;
}

function render(s) {
  const r = s.relay;
  const relay = document.getElementById("relay");
  relay.replaceChildren();
  const cert = r.certificate ? `certificate ${r.certificate.names.join(", ")} expires in ${r.certificate.days_left} days` : "no certificate (plain http)";
  const store = `${r.storage.backend} store${r.storage.writable ? "" : " NOT WRITABLE"}${r.storage.size_bytes != null ? `, ${num(Math.round(r.storage.size_bytes / 1024))} KiB` : ""}`;
  relay.append(`v${r.version} · up ${age(r.uptime_seconds)} · ${store} · ${cert} · `);
  relay.append(r.ready ? el("span", {}, "ready") : el("span", { class: "bad" }, `not ready: ${r.problems.join("; ")}`));
  if (r.cluster) {
    const relays = r.cluster.relays.map(([id, n]) => `${id === r.cluster.me ? "this relay" : id}: ${n}/${r.cluster.partitions}`);
    relay.append(el("div", { class: "cluster" }, `relays live: ${relays.join(" · ")} (conversation partitions held)`));
  }
  const main = document.getElementById("motions");
  // Failing Motions first, then those with a backlog, then the rest by name.
  const rank = (m) => (m.failing ? 0 : m.depth > 0 ? 1 : 2);
  const names = Object.keys(s.motions).sort((a, b) => rank(s.motions[a]) - rank(s.motions[b]) || a.localeCompare(b));
  main.replaceChildren(...names.map((n) => motionCard(n, s.motions[n])));
  document.body.dataset.generated = String(s.generated_unix_ms);
}

function connect() {
  const live = document.getElementById("live");
  const events = new EventSource("/board/events");
  events.onmessage = (e) => {
    live.classList.add("on");
    render(JSON.parse(e.data));
  };
  events.onerror = () => live.classList.remove("on");
}

document.addEventListener("DOMContentLoaded", connect);
