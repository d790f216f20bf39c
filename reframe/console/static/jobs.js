// Jobs: a page of /v1/jobs (newest first, filters from the address bar), kept live by the
// /v1/job-events stream: rows change in place and new matching jobs appear at the top.
import { age, api, badge, el, follow, jobLink, prefix, requireSignIn, showError, usd } from "./common.js";

const params = new URLSearchParams(location.search);
const filters = {
  state: params.get("state") || "",
  tenant: params.get("tenant") || "",
  from: params.get("from") || "",
  to: params.get("to") || "",
  q: params.get("q") || "",
  cursor: params.get("cursor") || "",
};
const tbody = document.querySelector("#jobs tbody");
const rows = new Map();
const live = document.getElementById("live");
const PAGE = 50;
let newest = 0;

for (const [name, id] of [["state", "f-state"], ["tenant", "f-tenant"], ["from", "f-from"], ["to", "f-to"], ["q", "f-q"]]) {
  document.getElementById(id).value = filters[name];
}

function ms(local) { return local ? String(new Date(local).getTime()) : ""; }

function matches(job) {
  if (filters.state && job.state !== filters.state) return false;
  if (filters.tenant && job.tenant !== filters.tenant) return false;
  if (filters.from && job.created_at_ms < Number(ms(filters.from))) return false;
  if (filters.to && job.created_at_ms > Number(ms(filters.to))) return false;
  if (filters.q) {
    const needle = filters.q.toLowerCase();
    const hay = [job.id, JSON.stringify(job.metadata || {})].join(" ").toLowerCase();
    if (!hay.includes(needle)) return false;
  }
  return true;
}

function row(job) {
  const tr = el("tr", { "data-job-id": job.id, "data-state": job.state, "data-tenant": job.tenant || "" },
    el("td", {}, jobLink(job.id)),
    el("td", { class: "state" }, badge(job.state)),
    el("td", { class: "tenant", text: job.tenant || "–" }),
    el("td", { text: job.priority }),
    el("td", { text: (job.input && job.input.aspect_ratio) || "–" }),
    el("td", { class: "age", "data-created": String(job.created_at_ms), text: age(job.created_at_ms), title: new Date(job.created_at_ms).toISOString() }),
    el("td", { class: "num", text: usd(job.cost_usd) }));
  return tr;
}

function upsert(job, { prepend = false } = {}) {
  newest = Math.max(newest, job.created_at_ms || 0);
  const old = rows.get(job.id);
  if (!old && !matches(job)) return;
  const tr = row(job);
  if (old) old.replaceWith(tr);
  else if (prepend) tbody.prepend(tr);
  else tbody.append(tr);
  if (old || prepend) tr.classList.add("flash");
  rows.set(job.id, tr);
  document.getElementById("empty").hidden = rows.size > 0;
  document.getElementById("count").textContent = `${rows.size} shown`;
}

function query(extra) {
  const q = new URLSearchParams({ order: "newest", limit: String(PAGE), ...extra });
  if (filters.state) q.set("state", filters.state);
  if (filters.tenant) q.set("tenant", filters.tenant);
  if (filters.from) q.set("created_from_ms", ms(filters.from));
  if (filters.to) q.set("created_to_ms", ms(filters.to));
  if (filters.q) q.set("q", filters.q);
  return q;
}

function pageLink(cursor) {
  const q = new URLSearchParams(location.search);
  if (cursor) q.set("cursor", cursor); else q.delete("cursor");
  return `${prefix}/jobs?${q}`;
}

async function main() {
  const me = await requireSignIn();
  if (!me) return;
  const tenantInput = document.getElementById("f-tenant");
  if (!me.admin) {
    // a tenant key lists its own tenant; naming another one shows the API's refusal
    tenantInput.value = filters.tenant || me.tenant;
    tenantInput.readOnly = true;
    tenantInput.setAttribute("aria-description", "A tenant key sees its own tenant only");
  }
  let page;
  try {
    page = await api(`/v1/jobs?${query(filters.cursor ? { cursor: filters.cursor } : {})}`);
  } catch (err) { showError(err); live.textContent = "not live"; return; }
  for (const job of page.items) upsert(job);
  document.getElementById("empty").hidden = rows.size > 0;
  document.getElementById("count").textContent = `${rows.size} shown`;
  const next = document.getElementById("next-page");
  if (page.next_cursor) { next.href = pageLink(page.next_cursor); next.hidden = false; }
  if (filters.cursor) { const first = document.getElementById("first-page"); first.href = pageLink(""); first.hidden = false; }

  // Follow the jobs on screen that are still moving, and (on the first page) new ones.
  const firstPage = !filters.cursor;
  const streamPath = () => {
    const q = new URLSearchParams();
    if (filters.tenant) q.set("tenant", filters.tenant);
    for (const [id, tr] of rows) {
      if (!["SUCCEEDED", "FAILED", "CANCELLED"].includes(tr.dataset.state)) q.append("watch", id);
    }
    // new jobs: from the newest one seen (ties are sent again, harmlessly), at most 5 minutes back
    const since = firstPage ? Math.max(newest, Date.now() - 300000) : Date.now() + 10 * 365 * 86400000;
    q.set("since_ms", String(since));
    return `/v1/job-events?${q}`;
  };
  follow(streamPath, (name, data) => {
    if (name === "job" && data) upsert(data, { prepend: firstPage });
  }, (status) => { live.textContent = status === "live" ? "● live" : status; live.dataset.status = status; });

  setInterval(() => {
    const now = Date.now();
    for (const cell of tbody.querySelectorAll("td.age")) cell.textContent = age(Number(cell.dataset.created), now);
  }, 5000);
}

main().catch(showError);
