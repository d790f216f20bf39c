// Dead letters: reasons grouped and counted, replay one or many with the CLI's refusals (a death
// fal may have billed needs an explicit confirmation that names the risk of paying twice), purge.
import { age, api, ApiError, el, jobLink, requireSignIn, showError } from "./common.js";

const MEANING = {
  ambiguous_submit: "The submit's answer was lost: fal may hold (and bill) the request. Replaying may pay twice.",
  result_unavailable: "fal ran the job but its result could not be read. Replaying may pay twice.",
  fal_validation: "fal's model rejected the input (its message is on the job).",
  retries_exhausted: "Every retry failed.",
  deadline_exceeded: "The job was not submitted before its deadline.",
};
const tbody = document.querySelector("#dead tbody");
const status = document.getElementById("dl-status");
const replayButton = document.getElementById("replay-selected");
const selectAll = document.getElementById("select-all");
let jobs = [];

function selected() {
  return [...tbody.querySelectorAll("input[type=checkbox]:checked")].map((c) => c.value);
}

function refreshButtons() {
  const n = selected().length;
  replayButton.disabled = n === 0;
  replayButton.textContent = n ? `Replay selected (${n})` : "Replay selected";
}

async function load() {
  const page = await api("/v1/dead-letters?limit=500");
  jobs = page.items;
  const counts = new Map();
  for (const j of jobs) counts.set(j.dead_letter_reason || "unknown", (counts.get(j.dead_letter_reason || "unknown") || 0) + 1);
  document.querySelector("#reasons tbody").replaceChildren(...[...counts.entries()].sort((a, b) => b[1] - a[1]).map(([reason, n]) =>
    el("tr", { "data-reason": reason }, el("td", {}, el("code", { text: reason })), el("td", { class: "num", text: String(n) }),
      el("td", { text: MEANING[reason] || "" }))));
  tbody.replaceChildren(...jobs.map((j) => {
    const failed = j.timestamps_ms.ts_FAILED || j.created_at_ms;
    return el("tr", { "data-job-id": j.id, "data-reason": j.dead_letter_reason || "" },
      el("td", {}, el("input", { type: "checkbox", value: j.id, "aria-label": `Select job ${j.id}` })),
      el("td", {}, jobLink(j.id)),
      el("td", {}, el("code", { text: j.dead_letter_reason || "–" })),
      el("td", { text: j.tenant || "–" }),
      el("td", { class: "num", text: String(j.attempts) }),
      el("td", { text: `${age(failed)} ago` }),
      el("td", { class: "msg", text: (j.error && j.error.message) || "" }));
  }));
  document.getElementById("empty").hidden = jobs.length > 0;
  selectAll.checked = false;
  refreshButtons();
}

async function replay(ids, force) {
  const done = [], refused = [], failed = [];
  for (const id of ids) {
    try {
      await api(`/v1/dead-letters/${encodeURIComponent(id)}/replay`, { method: "POST", body: { force } });
      done.push(id);
    } catch (err) {
      if (err instanceof ApiError && err.problem.type && String(err.problem.type).endsWith("replay-needs-force")) refused.push(id);
      else failed.push(`${id.slice(0, 12)}: ${err.message}`);
    }
  }
  return { done, refused, failed };
}

function askForce(ids) {
  const box = document.getElementById("force");
  document.getElementById("force-list").replaceChildren(...ids.map((id) => {
    const j = jobs.find((x) => x.id === id);
    return el("li", { "data-job-id": id }, el("code", { text: id }), ` — ${j ? j.dead_letter_reason : ""}`);
  }));
  box.dataset.ids = ids.join(",");
  const ack = document.getElementById("force-ack");
  ack.checked = false;
  document.getElementById("force-confirm").disabled = true;
  box.hidden = false;
  document.getElementById("force-h").focus();
}

function report({ done, refused, failed }) {
  const parts = [];
  if (done.length) parts.push(`${done.length} replayed`);
  if (refused.length) parts.push(`${refused.length} refused (may pay twice: confirm below)`);
  if (failed.length) parts.push(`${failed.length} failed: ${failed.join("; ")}`);
  status.textContent = parts.join(" · ");
}

async function main() {
  const me = await requireSignIn();
  if (!me) return;
  const canAct = me.admin || me.scopes.includes("enqueue");
  document.getElementById("dl-actions").hidden = !canAct;
  if (!canAct) status.textContent = "This key may read dead letters but not replay them (it lacks the enqueue scope).";
  try { await load(); } catch (err) { showError(err); return; }
  document.getElementById("force-h").tabIndex = -1;
  tbody.addEventListener("change", refreshButtons);
  selectAll.addEventListener("change", () => {
    for (const c of tbody.querySelectorAll("input[type=checkbox]")) c.checked = selectAll.checked;
    refreshButtons();
  });
  replayButton.addEventListener("click", async () => {
    replayButton.disabled = true;
    const result = await replay(selected(), false);
    report(result);
    await load();
    if (result.refused.length) askForce(result.refused);
  });
  document.getElementById("force-ack").addEventListener("change", (ev) => {
    document.getElementById("force-confirm").disabled = !ev.target.checked;
  });
  document.getElementById("force-confirm").addEventListener("click", async () => {
    const box = document.getElementById("force");
    const ids = box.dataset.ids.split(",").filter(Boolean);
    const result = await replay(ids, true);
    box.hidden = true;
    report(result);
    await load();
  });
  document.getElementById("force-cancel").addEventListener("click", () => {
    document.getElementById("force").hidden = true;
    status.textContent = "Left dead-lettered.";
  });
  const purge = document.getElementById("purge");
  const purgeBox = document.getElementById("purge-confirm");
  purge.addEventListener("click", () => { purgeBox.hidden = false; document.getElementById("purge-ack").checked = false; document.getElementById("purge-go").disabled = true; document.getElementById("purge-ack").focus(); });
  document.getElementById("purge-ack").addEventListener("change", (ev) => { document.getElementById("purge-go").disabled = !ev.target.checked; });
  document.getElementById("purge-cancel").addEventListener("click", () => { purgeBox.hidden = true; });
  document.getElementById("purge-go").addEventListener("click", async () => {
    try {
      const out = await api("/v1/dead-letters/purge", { method: "POST", body: { confirm: true } });
      status.textContent = `Purged ${out.purged} dead letter${out.purged === 1 ? "" : "s"}.`;
    } catch (err) { showError(err); }
    purgeBox.hidden = true;
    await load();
  });
}

main().catch(showError);
