// Cluster: GET /v1/cluster (admin) every 2 s, each figure a small live picture.
import { api, ApiError, el, requireSignIn, showError, usd, when } from "./common.js";

const live = document.getElementById("live");

function facts(id, pairs) {
  document.getElementById(id).replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
}

function meter(value, max, label) {
  return el("meter", { min: 0, max: Math.max(max, 0.000001), value, title: label, "aria-label": label });
}

function render(c) {
  const cap = c.limits.max_concurrency;
  document.getElementById("slots").textContent = `${c.slots_in_use} / ${cap ?? "?"}`;
  const m = document.getElementById("slots-meter");
  m.max = cap || Math.max(1, c.slots_in_use);
  m.value = c.slots_in_use;
  document.getElementById("slots-help").textContent = `${c.limits.reserved_high_slots ?? "?"} reserved for high priority · ${c.expired_leases} expired lease${c.expired_leases === 1 ? "" : "s"} being checked at fal`;
  const waits = Object.entries(c.waiting);
  const most = Math.max(1, ...waits.map(([, n]) => n));
  document.getElementById("waiting").replaceChildren(...waits.flatMap(([p, n]) => [
    el("dt", { text: p }), el("dd", {}, meter(n, most, `${p}: ${n} waiting`), ` ${n}`)]));
  document.getElementById("workers").textContent = String(c.workers.alive);
  document.getElementById("worker-list").replaceChildren(...c.workers.processes.map((p) =>
    el("li", {}, el("code", { text: p.process_id }), ` ${p.state || ""}${p.hostname ? " on " + p.hostname : ""}`)));
  facts("flow", [
    ["Submit pause", c.paused_until_ms ? `until ${when(c.paused_until_ms)}` : "not paused"],
    ["Breaker", el("span", { class: `badge b-${c.breaker.state}`, text: c.breaker.state })],
    ["Breaker trips", String(c.breaker.trips)],
    ["Submit rate", c.limits.submit_rate_per_s === null || c.limits.submit_rate_per_s === undefined ? "?" : `${c.limits.submit_rate_per_s}/s (burst ${c.limits.submit_burst})`],
  ]);
  const b = c.budget_usd;
  const row = (spent, reserved, cap, label) => {
    const used = spent + reserved;
    const head = cap === null ? "no cap published" : `${usd(Math.max(0, cap - used))} headroom of ${usd(cap)}`;
    return [label, el("span", {}, cap === null ? "" : meter(used, cap, `${label}: ${usd(used)} of ${usd(cap)}`), ` ${head} (${usd(spent)} spent + ${usd(reserved)} reserved)`)];
  };
  facts("budget", [row(b.day_spent, b.day_reserved, b.daily_cap, "Today"), row(b.month_spent, b.month_reserved, b.monthly_cap, "This month")]);
  facts("queues", [
    ["Celery queue", String(c.celery_queue)], ["Deferred", String(c.deferred)], ["Blocked by budget", String(c.blocked)],
    ["At fal (tracked)", String(c.tracked)], ["Dead letters", String(c.dead_letters)],
  ]);
  tenants(c);
  document.getElementById("cards").hidden = false;
}

// One row per tenant: its slots as a meter of what it may hold, its spend, and its headroom as a
// meter of its cap with the dollars written out (never colour alone).
function headroom(cls, cap, left, tenant, period) {
  if (cap === null) return el("td", { class: `${cls} no-cap`, text: "no cap" });
  const used = cap - left;
  const words = left < 0 ? `over by ${usd(-left)} of ${usd(cap)}` : `${usd(left)} left of ${usd(cap)}`;
  return el("td", { class: left < 0 ? `${cls} over` : cls, "data-headroom": String(left) },
    meter(Math.min(used, cap), cap, `${tenant}, ${period}: ${usd(used)} of ${usd(cap)} used`), words);
}

function tenants(c) {
  const capacity = c.limits.max_concurrency;
  const rows = c.tenants.map((t) => {
    const most = t.max_concurrent ?? capacity ?? Math.max(1, t.slots_in_use);
    return el("tr", { "data-tenant": t.tenant },
      el("th", { scope: "row" }, t.tenant, t.has_limits ? null : el("span", { class: "help", text: " (no limits set)" })),
      el("td", { class: "num slots" }, meter(t.slots_in_use, most, `${t.tenant}: ${t.slots_in_use} of ${most} slots`), String(t.slots_in_use)),
      el("td", { class: "num weight", text: String(t.weight) }),
      el("td", { class: "num max", text: t.max_concurrent === null ? "none" : String(t.max_concurrent) }),
      el("td", { class: "day", text: `${usd(t.day_spent)} + ${usd(t.day_reserved)}` }),
      headroom("day-headroom", t.day_cap, t.day_headroom, t.tenant, "today"),
      el("td", { class: "month", text: `${usd(t.month_spent)} + ${usd(t.month_reserved)}` }),
      headroom("month-headroom", t.month_cap, t.month_headroom, t.tenant, "this month"));
  });
  document.querySelector("#tenants tbody").replaceChildren(...rows);
  document.getElementById("tenants-empty").hidden = rows.length > 0;
  const more = document.getElementById("tenants-more");
  more.hidden = !c.tenants_not_shown;
  more.textContent = `and ${c.tenants_not_shown} more tenant${c.tenants_not_shown === 1 ? "" : "s"} with less use, not shown (reframe tenants list shows all with limits)`;
}

async function main() {
  const me = await requireSignIn();
  if (!me) return;
  if (!me.admin) { live.textContent = ""; showError(new Error("The cluster view needs an admin key.")); return; }
  const tick = async () => {
    try { render(await api("/v1/cluster")); live.textContent = `● live (updated ${new Date().toLocaleTimeString()})`; showError(null); }
    catch (err) { live.textContent = "not live"; showError(err instanceof ApiError && err.status === 403 ? new Error("The cluster view needs an admin key.") : err); }
  };
  await tick();
  setInterval(tick, 2000);
}

main().catch(showError);
