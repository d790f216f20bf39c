// Job: its timeline, details and errors from /v1/jobs/{id}/timeline, refreshed on every state change
// of /v1/jobs/{id}/events; the input and output videos side by side, played in sync, with the
// requested aspect ratio drawn over the input.
import { api, ApiError, badge, duration, el, follow, requireSignIn, showError, usd, when } from "./common.js";

const jobId = document.getElementById("job").dataset.jobId;
const input = document.getElementById("input-video");
const output = document.getElementById("output-video");
const play = document.getElementById("play");
const seek = document.getElementById("seek");
const clock = document.getElementById("clock");
let ratio = null;

const REASONS = {
  ambiguous_submit: "fal may hold the request: replay only if paying twice is acceptable",
  result_unavailable: "fal ran it but its result could not be read",
};

function fact(dl, term, value) {
  dl.append(el("dt", { text: term }), el("dd", {}, value));
}

function render(t) {
  const job = t.job;
  document.getElementById("job-state").replaceWith(Object.assign(badge(job.state), { id: "job-state" }));
  const ol = document.getElementById("timeline");
  ol.replaceChildren(...t.steps.map((s) => el("li", { "data-state": s.state },
    badge(s.state), " ",
    el("time", { dateTime: new Date(s.at_ms).toISOString(), text: when(s.at_ms) }), " ",
    el("span", { class: "dur", text: s.duration_ms === null ? `for ${duration(t.now_ms - s.at_ms)} so far` : s.duration_ms === 0 ? "final" : `for ${duration(s.duration_ms)}` }))));
  const dl = document.getElementById("facts");
  dl.replaceChildren();
  fact(dl, "Tenant", job.tenant || "–");
  fact(dl, "Priority", job.priority);
  fact(dl, "Aspect ratio", job.input.aspect_ratio || "–");
  fact(dl, "Created", when(job.created_at_ms));
  fact(dl, "Attempts", `${t.attempts} in this life · ${t.attempt_seq} in all · ${t.replays} replay${t.replays === 1 ? "" : "s"}`);
  fact(dl, "fal request ids", t.fal_request_ids.length ? el("span", {}, ...t.fal_request_ids.flatMap((r, i) => [i ? ", " : "", el("code", { text: r })])) : "–");
  fact(dl, "Idempotency key", t.idempotency_key ? el("code", { text: t.idempotency_key }) : "–");
  fact(dl, "Cost estimate", usd(t.estimate_usd));
  fact(dl, "Settled", t.settled_usd === null ? (job.terminal ? "nothing charged" : "not yet") : usd(t.settled_usd));
  if (job.dead_letter_reason) fact(dl, "Dead letter", `${job.dead_letter_reason}${REASONS[job.dead_letter_reason] ? " — " + REASONS[job.dead_letter_reason] : ""}`);
  if (t.callback_status) fact(dl, "Callback", t.callback_status);
  if (Object.keys(job.metadata || {}).length) fact(dl, "Metadata", el("code", { text: JSON.stringify(job.metadata) }));

  const errors = [];
  for (const [label, e] of [["Error", job.error], ["Last retried error", t.last_error]]) {
    if (!e) continue;
    const box = el("div", { class: "error-box" }, el("h3", { text: `${label}: ${e.type || "error"}` }),
      el("p", { class: "fal-message", text: e.message || "" }));
    if (e.detail && Object.keys(e.detail).length) box.append(el("pre", { text: JSON.stringify(e.detail, null, 2) }));
    errors.push(box);
  }
  document.getElementById("errors").replaceChildren(...errors);
  document.getElementById("errors-section").hidden = errors.length === 0;

  ratio = job.input.aspect_ratio || null;
  if (job.input.video_url && input.getAttribute("src") !== job.input.video_url) input.src = job.input.video_url;
  if (job.video_url && output.getAttribute("src") !== job.video_url) output.src = job.video_url;
  document.getElementById("output-caption").textContent = job.video_url ? `(${job.input.aspect_ratio})` : job.terminal ? "(none)" : "(not ready yet)";
  drawRatio();
  return job;
}

function drawRatio() {
  const box = document.getElementById("ratio-box");
  if (!ratio || !input.videoWidth) { box.hidden = true; return; }
  const [a, b] = ratio.split(":").map(Number);
  const want = a / b;
  const vw = input.clientWidth, vh = input.clientHeight;
  const natural = input.videoWidth / input.videoHeight;
  // the picture inside the element (object-fit: contain)
  let cw = vw, ch = vw / natural;
  if (ch > vh) { ch = vh; cw = vh * natural; }
  let w = cw, h = cw / want;
  if (h > ch) { h = ch; w = ch * want; }
  Object.assign(box.style, { width: `${w}px`, height: `${h}px`, left: `${(vw - w) / 2}px`, top: `${(vh - h) / 2}px` });
  box.dataset.ratio = ratio;
  box.hidden = false;
  document.getElementById("input-caption").textContent = `(${input.videoWidth}×${input.videoHeight}; the box is ${ratio})`;
}

function playerReady() {
  const ready = input.readyState >= 1 && (!output.getAttribute("src") || output.readyState >= 1);
  play.disabled = !ready;
  seek.disabled = !ready;
}

function sync() {
  if (!output.getAttribute("src") || output.readyState < 1) return;
  if (Math.abs(output.currentTime - input.currentTime) > 0.15 && input.currentTime <= output.duration) {
    output.currentTime = input.currentTime;
  }
}

play.addEventListener("click", async () => {
  if (input.paused) {
    if (input.ended) input.currentTime = 0;
    sync();
    const both = [input.play()];
    if (output.getAttribute("src")) both.push(output.play());
    try { await Promise.all(both); } catch (err) { showError(err); }
  } else {
    input.pause();
    output.pause();
  }
});
input.addEventListener("play", () => { play.textContent = "Pause both"; });
input.addEventListener("pause", () => { play.textContent = "Play both"; output.pause(); });
input.addEventListener("timeupdate", () => {
  sync();
  clock.textContent = `${input.currentTime.toFixed(1)} s`;
  if (input.duration) seek.value = String(Math.round((input.currentTime / input.duration) * 1000));
});
input.addEventListener("seeked", sync);
seek.addEventListener("input", () => {
  if (!input.duration) return;
  input.currentTime = (Number(seek.value) / 1000) * input.duration;
  sync();
});
seek.setAttribute("aria-valuetext", "0 s");
for (const v of [input, output]) {
  v.addEventListener("loadedmetadata", () => { playerReady(); drawRatio(); });
  v.addEventListener("error", () => showError(new Error(`the ${v === input ? "input" : "output"} video could not be loaded`)));
}
window.addEventListener("resize", drawRatio);

async function load() {
  const t = await api(`/v1/jobs/${encodeURIComponent(jobId)}/timeline`);
  return render(t);
}

async function main() {
  const me = await requireSignIn();
  if (!me) return;
  let job;
  try { job = await load(); } catch (err) {
    showError(err instanceof ApiError && err.status === 404 ? new Error(`No job ${jobId} (or not one this key may see).`) : err);
    return;
  }
  const canAct = me.scopes.includes("enqueue") || me.admin;
  const actions = document.getElementById("actions");
  const cancel = document.getElementById("cancel");
  const toDead = document.getElementById("to-dead-letters");
  const refreshActions = (j) => {
    cancel.hidden = !canAct || j.terminal;
    toDead.hidden = !canAct || !j.dead_letter_reason;
    actions.hidden = cancel.hidden && toDead.hidden;
  };
  refreshActions(job);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try { const out = await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }); refreshActions(render(await api(`/v1/jobs/${encodeURIComponent(jobId)}/timeline`))); showError(new Error(`cancel: ${out.outcome}`)); }
    catch (err) { showError(err); } finally { cancel.disabled = false; }
  });
  if (!job.terminal) {
    const stream = follow(() => `/v1/jobs/${encodeURIComponent(jobId)}/events`, async (name) => {
      if (name === "state" || name === "end") {
        try { const j = await load(); refreshActions(j); if (j.terminal) stream.stop(); } catch (err) { showError(err); }
      }
    }, () => {});
  }
}

main().catch(showError);
