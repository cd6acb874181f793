// tuneforge dashboard: hash routes #/ (runs), #/run/NAME, #/compare/A,B, #/chat. No build step.
"use strict";

const view = document.getElementById("view");
const state = { runs: [], root: "", serveUrl: "", sort: "started", desc: true, filter: "", picked: new Set(),
  cleanup: [] };
const COLORS = ["#2f5fd0", "#d0562f", "#17902b", "#8a3fd0", "#c9a400", "#0f8fa0", "#d02f8a", "#555"];

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
const fmt = (v, d = 4) => v === null || v === undefined ? "–" : typeof v === "number" ? +v.toPrecision(d) : v;
const runHref = (name) => "#/run/" + encodeURIComponent(name);
const q = (params) => new URLSearchParams(params).toString();
const empty = (...children) => h("div", { class: "empty" }, ...children);
const cmd = (text) => h("code", {}, text);

async function api(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function ago(t) {
  if (!t) return "–";
  const s = Date.now() / 1000 - t;
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 129600) return Math.round(s / 3600) + " h ago";
  return new Date(t * 1000).toLocaleDateString();
}
function duration(r) {
  if (!r.started) return "–";
  const s = (r.ended || Date.now() / 1000) - r.started;
  return s < 120 ? Math.round(s) + " s" : s < 7200 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
}
const badge = (status) => h("span", { class: "badge " + status, "data-status": status }, status);

// ---- live metrics: one EventSource per run, records merged by step -------------------------------------

function watch(name, onRecords) {
  let rows = new Map();
  const source = new EventSource("/api/stream?" + q({ run: name }));
  source.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.reset) rows = new Map();
    for (const r of msg.records) rows.set(r.step, Object.assign(rows.get(r.step) || {}, r));
    onRecords([...rows.values()].sort((a, b) => a.step - b.step), msg.status);
  };
  source.addEventListener("end", (e) => { source.close(); onRecords(null, JSON.parse(e.data).status); });
  state.cleanup.push(() => source.close());
}

function chart(title, id) {
  const box = h("div", { class: "chart", id, "data-points": "0" }, h("h3", {}, title));
  let plot = null;
  box.update = (data, names) => {
    box.dataset.points = data[0].length;
    const key = names.join("|");
    if (plot && plot.key === key) { plot.setData(data); return; }
    if (plot) plot.destroy();
    const series = [{ label: "step" }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length],
      width: 1.6, spanGaps: true, points: { show: data[0].length < 40 } }))];
    plot = new uPlot({ width: Math.max(box.clientWidth - 16, 300), height: 220, series,
      scales: { x: { time: false } }, axes: [{ label: "step" }, { size: 60 }] }, data, box);
    plot.key = key;
  };
  const resize = () => plot && plot.setSize({ width: Math.max(box.clientWidth - 16, 300), height: 220 });
  window.addEventListener("resize", resize);
  state.cleanup.push(() => window.removeEventListener("resize", resize));
  return box;
}

// columns [steps, ...one per key] for uPlot; missing values are null
function columns(rows, keys) {
  const xs = rows.filter((r) => keys.some((k) => typeof r[k] === "number")).map((r) => r.step);
  const byStep = new Map(rows.map((r) => [r.step, r]));
  return [xs, ...keys.map((k) => xs.map((x) => { const v = byStep.get(x)[k]; return typeof v === "number" ? v : null; }))];
}

// ---- Runs -------------------------------------------------------------------------------------------------

const RUN_COLS = [["name", "run"], ["status", "status"], ["method", "method"], ["model", "model"],
  ["data", "data"], ["step", "steps", true], ["loss", "loss", true], ["best_val_loss", "best val loss", true],
  ["started", "started", true], ["duration", "time", true]];

async function viewRuns() {
  const body = await api("/api/runs");
  Object.assign(state, { runs: body.runs, root: body.root, serveUrl: body.serve_url });
  view.replaceChildren(h("h1", {}, "Runs"), h("div", { class: "muted" }, "in ", cmd(state.root)));
  if (!state.runs.length) {
    view.append(empty(h("p", {}, "No runs here yet. Start one and it shows up as soon as it writes its config:"),
      h("pre", {}, `tuneforge train --model smollm2-135m --data builtin:tasks --output ${state.root}/first-run`),
      h("p", {}, "or point the dashboard at your runs folder: ", cmd("tuneforge ui --runs DIR"))));
    return;
  }
  const filter = h("input", { type: "search", id: "filter", placeholder: "filter: name, status, method, model, data  (/)",
    value: state.filter, oninput: (e) => { state.filter = e.target.value; fill(); } });
  const compareBtn = h("button", { id: "compare-btn", onclick: () => compareSelected() });
  const thead = h("tr", {}, h("th", {}, ""), RUN_COLS.map(([key, label, num]) => h("th", { class: num ? "num" : "" },
    h("button", { "data-sort": key, onclick: () => { state.desc = state.sort === key ? !state.desc : num;
      state.sort = key; fill(); } }, label))));
  const tbody = h("tbody", { id: "runs" });
  view.append(h("div", { class: "toolbar" }, filter, compareBtn), h("table", {}, h("thead", {}, thead), tbody));

  function fill() {
    const f = state.filter.toLowerCase();
    const val = (r, k) => k === "duration" ? (r.ended || Date.now() / 1000) - (r.started || 0) : r[k];
    const rows = state.runs.filter((r) => !f || [r.name, r.status, r.method, r.model, r.data].join(" ")
      .toLowerCase().includes(f));
    rows.sort((a, b) => { const x = val(a, state.sort) ?? "", y = val(b, state.sort) ?? "";
      return (x < y ? -1 : x > y ? 1 : 0) * (state.desc ? -1 : 1); });
    tbody.replaceChildren(...rows.map((r) => h("tr", { "data-run": r.name },
      h("td", {}, h("input", { type: "checkbox", "aria-label": "pick " + r.name, checked: state.picked.has(r.name),
        onchange: (e) => { e.target.checked ? state.picked.add(r.name) : state.picked.delete(r.name); count(); } })),
      h("td", {}, h("a", { href: runHref(r.name) }, r.name)), h("td", {}, badge(r.status)),
      h("td", {}, r.method ?? "–"), h("td", {}, r.model ?? "–"), h("td", {}, r.data || "–"),
      h("td", { class: "num" }, r.max_steps ? `${r.step} / ${r.max_steps}` : r.step),
      h("td", { class: "num" }, fmt(r.loss)), h("td", { class: "num" }, fmt(r.best_val_loss)),
      h("td", { class: "num" }, ago(r.started)), h("td", { class: "num" }, duration(r)))));
    if (!rows.length) tbody.append(h("tr", {}, h("td", { colspan: 11, class: "muted" }, "No run matches the filter.")));
    count();
  }
  function count() {
    compareBtn.textContent = `Compare ticked runs (${state.picked.size})`;
    compareBtn.disabled = state.picked.size < 2;
  }
  fill();
  const timer = setInterval(async () => { // statuses and steps move while runs train
    try { state.runs = (await api("/api/runs")).runs; fill(); } catch (e) { /* the next tick retries */ }
  }, 5000);
  state.cleanup.push(() => clearInterval(timer));
}

function compareSelected() {
  if (state.picked.size >= 2) location.hash = "#/compare/" + [...state.picked].map(encodeURIComponent).join(",");
}

// ---- One run ----------------------------------------------------------------------------------------------

async function viewRun(name) {
  const d = await api("/api/run?" + q({ run: name }));
  const s = d.summary;
  const status = badge(s.status);
  view.replaceChildren(h("h1", {}, s.name, " ", status),
    h("div", { class: "muted" }, [s.method, s.model, s.data].filter(Boolean).join(" · "),
      s.error ? h("span", { class: "error" }, " · " + s.error) : null));
  const charts = { loss: chart("loss (train, validation)", "chart-loss"), lr: chart("learning rate", "chart-lr"),
    tps: chart("tokens / s", "chart-tps"), grad: chart("gradient norm", "chart-grad"),
    forget: chart("forgetting", "chart-forget") };
  const waiting = empty(h("p", {}, "No metrics yet: ", cmd("tuneforge train"), " writes ",
    cmd("metrics.jsonl"), " after its first step (every ", cmd("train.log_every"), " steps)."));
  const grid = h("div", { class: "charts" }, charts.loss, charts.lr, charts.tps, charts.grad);
  view.append(h("h2", {}, "Curves"), waiting, grid);
  grid.hidden = true;
  watch(name, (rows, st) => {
    status.className = "badge " + st; status.textContent = st; status.dataset.status = st;
    if (!rows || !rows.length) return;
    waiting.remove(); grid.hidden = false;
    charts.loss.update(columns(rows, ["loss", "val_loss"]), ["loss", "val_loss"]);
    charts.lr.update(columns(rows, ["lr"]), ["lr"]);
    charts.tps.update(columns(rows, ["tokens_per_s"]), ["tokens/s"]);
    charts.grad.update(columns(rows, ["grad_norm"]), ["grad norm"]);
    const fk = [...new Set(rows.flatMap((r) => Object.keys(r).filter((k) => k.startsWith("forget/"))))];
    if (fk.length) { if (!charts.forget.isConnected) grid.append(charts.forget); charts.forget.update(columns(rows, fk), fk); }
  });

  view.append(h("h2", {}, "Evaluation"), d.evals.length ? d.evals.map(evalTable) : empty(
    "No eval results in this run. Evaluate it: ",
    cmd(`tuneforge eval --adapter ${state.root}/${name}/adapter --data test.jsonl --output ${state.root}/${name}/eval`)));
  const plots = d.plots.filter((p) => !d.data.histograms.includes(p));
  if (plots.length) view.append(h("h2", {}, "Plots"), h("div", { class: "plots" }, plots.map((p) => figure(name, p))));
  for (const rel of d.reports) view.append(h("h2", {}, rel), await report(name, rel));
  view.append(h("div", { class: "grid2" },
    h("div", {}, h("h2", {}, "Data"), dataSummary(name, d.data, s)),
    h("div", {}, h("h2", {}, "Resolved config"), d.config_text ? h("pre", { id: "config" }, d.config_text)
      : empty("No config.yaml in this run."))));
}

const fileUrl = (run, path) => "/api/file?" + q({ run, path });
const figure = (run, path) => h("figure", {}, h("img", { class: "plot", src: fileUrl(run, path), alt: path, loading: "lazy" }),
  h("figcaption", { class: "muted" }, path));

function evalTable(t) {
  return h("div", {}, h("h3", {}, t.name), h("table", { class: "eval" },
    h("thead", {}, h("tr", {}, t.columns.map((c, i) => h("th", { class: i ? "num" : "" }, c)))),
    h("tbody", {}, t.rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: i ? "num" : "" }, fmt(c))))))));
}

async function report(run, rel) {
  const box = h("div", { class: "report" });
  try { box.innerHTML = (await api(fileUrl(run, rel))).html; } // rendered server-side with raw HTML disabled
  catch (e) { box.append(h("p", { class: "error" }, e.message)); }
  const dir = rel.includes("/") ? rel.slice(0, rel.lastIndexOf("/") + 1) : "";
  for (const img of box.querySelectorAll("img")) {
    const src = img.getAttribute("src");
    if (src && !/^[a-z]+:|^\//i.test(src)) img.src = fileUrl(run, dir + src); // report images are relative
  }
  return box;
}

function dataSummary(run, data, s) {
  const rows = (data.config.train || []).map((t) => h("tr", {}, h("td", {}, t.path), h("td", {}, t.format ?? "auto"),
    h("td", { class: "num" }, t.weight ?? 1)));
  const facts = [["max_seq_len", data.config.max_seq_len], ["packing", data.config.packing],
    ["val_fraction", data.config.val_fraction], ["trained tokens", s.trained_tokens]];
  return h("div", {}, rows.length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "dataset"), h("th", {}, "format"),
    h("th", { class: "num" }, "weight"))), h("tbody", {}, rows)) : null,
  h("table", {}, h("tbody", {}, facts.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, fmt(v, 8)))))),
  data.histograms.length ? data.histograms.map((p) => figure(run, p))
    : h("p", { class: "muted" }, "Token lengths: ", cmd("tuneforge data inspect --data FILE"), " draws the histogram."));
}

// ---- Compare ----------------------------------------------------------------------------------------------

async function viewCompare(names) {
  if (names.length < 2) {
    view.replaceChildren(h("h1", {}, "Compare"), empty(h("p", {}, "Pick two or more runs: tick them in the ",
      h("a", { href: "#/" }, "Runs"), " list, then press Compare (or ", h("kbd", {}, "c"), ").")));
    return;
  }
  const d = await api("/api/compare?" + names.map((n) => "run=" + encodeURIComponent(n)).join("&"));
  view.replaceChildren(h("h1", {}, "Compare ", names.length, " runs"));
  view.append(h("table", { id: "compare-runs" }, h("thead", {}, h("tr", {}, ["", "run", "status", "method", "steps",
    "loss", "best val loss"].map((c) => h("th", {}, c)))), h("tbody", {}, d.runs.map((r, i) => h("tr", {},
    h("td", {}, h("span", { style: `color:${COLORS[i % COLORS.length]}` }, "■")), h("td", {}, h("a", { href: runHref(r.name) }, r.name)),
    h("td", {}, badge(r.status)), h("td", {}, r.method ?? "–"), h("td", { class: "num" }, r.step),
    h("td", { class: "num" }, fmt(r.loss)), h("td", { class: "num" }, fmt(r.best_val_loss)))))));
  const metrics = [["loss", "train loss"], ["val_loss", "validation loss"], ["lr", "learning rate"], ["tokens_per_s", "tokens / s"]];
  const charts = metrics.map(([k, title]) => chart(title, "cmp-" + k));
  view.append(h("h2", {}, "Curves"), h("div", { class: "charts" }, charts));
  const perRun = names.map(() => []);
  names.forEach((name, i) => watch(name, (rows) => {
    if (!rows) return;
    perRun[i] = rows;
    metrics.forEach(([k], j) => {
      const steps = [...new Set(perRun.flatMap((rs) => rs.filter((r) => typeof r[k] === "number").map((r) => r.step)))]
        .sort((a, b) => a - b);
      const cols = perRun.map((rs) => { const m = new Map(rs.map((r) => [r.step, r[k]]));
        return steps.map((x) => typeof m.get(x) === "number" ? m.get(x) : null); });
      charts[j].update([steps, ...cols], names);
    });
  }));
  view.append(h("h2", {}, "Config differences"), d.diff.length ? h("table", { class: "diff", id: "config-diff" },
    h("thead", {}, h("tr", {}, h("th", {}, "key"), names.map((n) => h("th", {}, n)))),
    h("tbody", {}, d.diff.map((row) => h("tr", {}, h("td", {}, h("code", {}, row.key)), row.values.map((v, i) =>
      h("td", { class: i && JSON.stringify(v) !== JSON.stringify(row.values[0]) ? "changed" : "" }, fmt(v, 8)))))))
    : empty("The resolved configs are identical."));
  view.append(h("h2", {}, "Evaluation side by side"), h("div", { class: "chat-cols" }, names.map((n, i) => h("div", {},
    h("h3", {}, n), d.evals[i].length ? d.evals[i].map(evalTable) : h("p", { class: "muted" }, "no eval results")))));
}

// ---- Try it: the same prompt to the base and adapters of a running `tuneforge serve` ------------------

const chatState = { url: "", key: "", models: [], chosen: new Set(), history: {} };

async function viewChat() {
  if (!state.serveUrl) Object.assign(state, { serveUrl: (await api("/api/runs")).serve_url });
  chatState.url = chatState.url || state.serveUrl;
  const url = h("input", { type: "text", id: "serve-url", value: chatState.url, size: 32, "aria-label": "server URL" });
  const key = h("input", { type: "password", id: "serve-key", value: chatState.key, placeholder: "API key (if any)",
    "aria-label": "API key" });
  const status = h("div", { id: "chat-status" });
  const models = h("div", { class: "models", id: "models" });
  const prompt = h("textarea", { id: "prompt", placeholder: "Ask all the ticked models the same thing (Ctrl+Enter sends)",
    onkeydown: (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); } });
  const sendBtn = h("button", { id: "send", onclick: () => send() }, "Send");
  const cols = h("div", { class: "chat-cols", id: "answers" });
  view.replaceChildren(h("h1", {}, "Try it"),
    h("div", { class: "toolbar" }, url, key, h("button", { id: "connect", onclick: () => connect() }, "Connect"),
      h("button", { class: "plain", onclick: () => { chatState.history = {}; render(); } }, "Clear")),
    status, models, prompt, h("div", { class: "toolbar" }, sendBtn), cols);

  async function connect() {
    Object.assign(chatState, { url: url.value.trim(), key: key.value });
    status.replaceChildren("connecting…");
    try {
      const body = await api("/api/chat/models?" + q({ url: chatState.url, key: chatState.key }));
      chatState.models = body.data.map((m) => m.id);
      chatState.chosen = new Set(chatState.models.slice(0, 4));
      status.replaceChildren(h("span", { class: "muted" }, `${chatState.models.length} models at ${chatState.url}`));
    } catch (e) {
      chatState.models = [];
      status.replaceChildren(empty(h("p", { class: "error" }, e.message), h("p", {}, "Start a server over your runs' adapters:"),
        h("pre", {}, "tuneforge serve --model smollm2-135m --adapters runs/   # then Connect")));
    }
    render();
  }
  function render() {
    models.replaceChildren(...chatState.models.map((m) => h("label", {}, h("input", { type: "checkbox", value: m,
      checked: chatState.chosen.has(m), onchange: (e) => { e.target.checked ? chatState.chosen.add(m) : chatState.chosen.delete(m);
        render(); } }), " ", m)));
    sendBtn.disabled = !chatState.chosen.size;
    cols.replaceChildren(...[...chatState.chosen].map((m) => h("div", { class: "chat-col", "data-model": m },
      h("h3", {}, m), (chatState.history[m] || []).map((msg) => h("div", { class: "msg " + msg.role }, msg.content)))));
  }
  async function send() {
    const text = prompt.value.trim();
    if (!text || !chatState.chosen.size) return;
    prompt.value = "";
    const chosen = [...chatState.chosen];
    for (const m of chosen) (chatState.history[m] ||= []).push({ role: "user", content: text });
    render();
    await Promise.all(chosen.map((m) => answer(m, cols.querySelector(`[data-model="${CSS.escape(m)}"]`))));
  }
  async function answer(model, col) {
    const messages = chatState.history[model].slice();
    const reply = { role: "assistant", content: "" };
    chatState.history[model].push(reply);
    const out = h("div", { class: "msg assistant", "data-done": "0" });
    col.append(out);
    try {
      const r = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ url: chatState.url, key: chatState.key, model, messages, max_tokens: 128 }) });
      if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error?.message || r.statusText);
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i).trim(); buf = buf.slice(i + 1);
          if (!line.startsWith("data:") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(5));
          if (chunk.error) throw new Error(chunk.error.message);
          reply.content += chunk.choices?.[0]?.delta?.content || "";
          out.textContent = reply.content;
        }
      }
    } catch (e) { out.append(h("span", { class: "error" }, " [" + e.message + "]")); }
    out.dataset.done = "1";
  }
  if (chatState.url) await connect(); else render();
}

// ---- routing and keys -------------------------------------------------------------------------------------

async function route() {
  state.cleanup.splice(0).forEach((f) => f());
  const [, page, arg = ""] = location.hash.match(/^#\/(\w*)\/?(.*)$/) || [null, "", ""];
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === (page || "runs"));
  try {
    if (page === "run") await viewRun(decodeURIComponent(arg));
    else if (page === "compare") await viewCompare(arg ? arg.split(",").map(decodeURIComponent)
      : [...state.picked]);
    else if (page === "chat") await viewChat();
    else await viewRuns();
  } catch (e) {
    view.replaceChildren(h("h1", {}, "Something is missing"), empty(h("p", { class: "error" }, e.message),
      h("p", {}, h("a", { href: "#/" }, "Back to the runs"))));
  }
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) return;
  const go = { r: "#/", t: "#/chat" }[e.key];
  if (go) { location.hash = go; e.preventDefault(); }
  else if (e.key === "c") { state.picked.size >= 2 ? compareSelected() : (location.hash = "#/compare"); e.preventDefault(); }
  else if (e.key === "/" && document.getElementById("filter")) { document.getElementById("filter").focus(); e.preventDefault(); }
});
window.addEventListener("hashchange", route);
route();
