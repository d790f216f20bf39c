// Shared by every console page: the key in sessionStorage, calls to the public API with it as a
// bearer token, a Server-Sent Events reader over fetch (EventSource cannot send headers), and a
// DOM builder that only ever sets text (never HTML), so no job field can inject markup.
const KEY = "reframe.console.key";
const WHO = "reframe.console.who";
export const prefix = document.body.dataset.prefix || "/console";

export function token() { return sessionStorage.getItem(KEY); }
export function who() {
  try { return JSON.parse(sessionStorage.getItem(WHO) || "null"); } catch { return null; }
}
export function remember(key, me) {
  sessionStorage.setItem(KEY, key);
  sessionStorage.setItem(WHO, JSON.stringify(me));
}
export function signOut() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(WHO);
}

// A link may carry the key in its fragment (`#key=rfk_...`, printed by `reframe up` and the demo):
// fragments never reach the server; the key moves to sessionStorage and leaves the address bar.
export function keyFromFragment() {
  const m = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  if (!m) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(m[1]);
}

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

export async function api(path, { method = "GET", body, key } = {}) {
  const headers = { Authorization: `Bearer ${key || token()}`, Accept: "application/json" };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  const text = await res.text();
  if (text) { try { data = JSON.parse(text); } catch { data = null; } }
  if (res.status === 401 && !key) { goSignIn(); }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// Read an SSE stream with fetch; calls onEvent(name, data) per event until the stream ends or
// `signal` aborts. Resolves when the server ends the stream.
export async function sse(path, onEvent, signal) {
  const res = await fetch(path, {
    headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" },
    cache: "no-store",
    signal,
  });
  if (res.status === 401) { goSignIn(); }
  if (!res.ok) {
    let problem = null;
    try { problem = await res.json(); } catch { problem = null; }
    throw new ApiError(res.status, problem);
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) {
        let parsed = null;
        try { parsed = JSON.parse(data.join("\n")); } catch { parsed = null; }
        onEvent(name, parsed);
      }
    }
  }
}

// Follow an SSE stream for as long as the page lives, reconnecting with a back-off.
export function follow(makePath, onEvent, onStatus) {
  let stopped = false;
  let controller = null;
  let delay = 500;
  (async () => {
    while (!stopped) {
      controller = new AbortController();
      try {
        onStatus("live");
        await sse(makePath(), onEvent, controller.signal);
        delay = 500;
      } catch (err) {
        if (stopped) return;
        onStatus(err instanceof ApiError ? `error: ${err.message}` : "reconnecting…");
        delay = Math.min(delay * 2, 10000);
      }
      if (!stopped) await new Promise((r) => setTimeout(r, delay));
    }
  })();
  return { stop() { stopped = true; if (controller) controller.abort(); }, restart() { if (controller) controller.abort(); } };
}

export function goSignIn() {
  signOut();
  const next = encodeURIComponent(location.pathname + location.search);
  location.assign(`${prefix}/signin?next=${next}`);
}

// Every page but the sign-in page: make sure there is a key, show who is signed in, wire sign-out.
export function requireSignIn() {
  const fromLink = keyFromFragment();
  if (fromLink) sessionStorage.setItem(KEY, fromLink);
  if (!token()) { goSignIn(); return null; }
  let me = who();
  const ready = (async () => {
    if (!me || fromLink) {
      me = await api("/v1/me");
      remember(token(), me);
    }
    const whoEl = document.getElementById("who");
    if (whoEl) whoEl.textContent = `${me.admin ? "admin" : "tenant " + me.tenant} · key ${me.key_id} (${me.scopes.join(", ")})`;
    for (const el of document.querySelectorAll("[data-admin-only]")) el.hidden = !me.admin;
    return me;
  })();
  const out = document.getElementById("signout");
  if (out) out.addEventListener("click", () => { signOut(); location.assign(`${prefix}/signin`); });
  return ready;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function badge(state) {
  return el("span", { class: `badge s-${String(state).toLowerCase()}`, text: state });
}

export function usd(x) {
  return x === null || x === undefined ? "–" : `$${Number(x).toFixed(2)}`;
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  const s = ms / 1000;
  if (s < 1) return `${Math.round(ms)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 172800) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

export function age(ms, now = Date.now()) {
  return duration(Math.max(0, now - ms));
}

export function when(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function jobLink(id) {
  return el("a", { href: `${prefix}/jobs/${encodeURIComponent(id)}`, class: "mono", text: id.slice(0, 12), title: id },
    el("span", { class: "sr-only", text: id.slice(12) }));
}

export function showError(err) {
  const box = document.getElementById("error");
  if (box) box.textContent = err ? (err.message || String(err)) : "";
}
