#!/usr/bin/env node
// A Reframe Cluster client in Node (18 or newer): enqueue a job over the HTTP API, follow its
// Server-Sent Events to the terminal state, receive its callback on a small HTTP server of our own
// and verify the callback's Standard Webhooks signature with the npm `standardwebhooks` library.
// A tampered body, a signature made with another secret and a moved timestamp must each be
// rejected. Prints one JSON summary on stdout; exits 0 only when every check held.
//
//   API_URL           the API, e.g. http://127.0.0.1:8080
//   API_TOKEN         a key with the enqueue and read scopes (`reframe keys create ... --json`)
//   CALLBACK_SECRET   the whsec_ secret callbacks are signed with (REFRAME_CALLBACK_SECRETS)
//   VIDEO_URL         the clip to reframe
//   ASPECT_RATIO      optional, default 9:16
//   CALLBACK_HOST     optional, where the callback server listens and what the job's
//                     callback_url names; default 127.0.0.1 (the cluster must be allowed to reach
//                     it: the guarded fetcher refuses loopback unless REFRAME_FETCH_ALLOW names it)
//   IDEMPOTENCY_KEY   optional, default node-<random uuid>
//   TIMEOUT_S         optional, default 120: the deadline of the whole session
//
// usage: cd clients/node && npm ci && API_URL=... API_TOKEN=... CALLBACK_SECRET=... VIDEO_URL=... node session.mjs

import { randomUUID } from "node:crypto";
import http from "node:http";

import { createParser } from "eventsource-parser";
import { Webhook, WebhookVerificationError } from "standardwebhooks";

// The happy path's order of job states (README "Job states"); SSE may skip some (it samples the
// record), never go back.
const ORDER = ["QUEUED", "WAITING", "BLOCKED", "DEFERRED", "SUBMITTING", "IN_QUEUE", "IN_PROGRESS", "SUCCEEDED"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

function env(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === "") {
    throw new Error(`${name} is not set`);
  }
  return value;
}

/** An HTTP server on host:0 that answers 204 to POST /callback and hands over the first one. */
async function startReceiver(host) {
  const deliveries = [];
  let resolveFirst;
  const first = new Promise((resolve) => {
    resolveFirst = resolve;
  });
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      const delivery = { method: req.method, path: req.url, headers: req.headers, body: Buffer.concat(chunks) };
      deliveries.push(delivery);
      res.writeHead(req.method === "POST" && req.url === "/callback" ? 204 : 404).end();
      if (req.method === "POST" && req.url === "/callback") {
        resolveFirst(delivery);
      }
    });
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, host, resolve);
  });
  const { port } = server.address();
  const hostInUrl = host.includes(":") ? `[${host}]` : host;
  return {
    url: `http://${hostInUrl}:${port}/callback`,
    deliveries,
    first,
    close() {
      server.closeAllConnections?.();
      server.close();
    },
  };
}

async function api(base, token, method, path, { body, headers = {}, signal } = {}) {
  const res = await fetch(new URL(path, base), {
    method,
    headers: {
      Authorization: `Bearer ${token}`,
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      ...headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: res.status, headers: res.headers, json };
}

/** Follow GET /v1/jobs/{id}/events until `event: end`; returns the state events and the end. */
async function followEvents(base, token, jobId, signal) {
  const res = await fetch(new URL(`/v1/jobs/${jobId}/events`, base), {
    headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" },
    signal,
  });
  const contentType = res.headers.get("content-type") ?? "";
  if (res.status !== 200 || !contentType.startsWith("text/event-stream")) {
    throw new Error(`events: HTTP ${res.status} ${contentType}: ${await res.text()}`);
  }
  const states = [];
  let end = null;
  let comments = 0;
  const parser = createParser({
    onEvent(message) {
      const data = JSON.parse(message.data);
      if (message.event === "state") {
        states.push({ id: message.id, state: data.state });
      } else if (message.event === "end") {
        end = data;
      }
    },
    onComment() {
      comments += 1;
    },
  });
  const decoder = new TextDecoder();
  for await (const chunk of res.body) {
    parser.feed(decoder.decode(chunk, { stream: true }));
    if (end !== null) {
      break; // the server ends the stream after `end`; do not wait for the close
    }
  }
  if (end === null) {
    throw new Error("events: the stream closed without an `end` event");
  }
  return { states, end, comments };
}

/** True when `verify` throws the library's verification error, false when it accepts. */
function rejects(secret, body, headers) {
  try {
    new Webhook(secret).verify(body, headers);
    return false;
  } catch (err) {
    if (err instanceof WebhookVerificationError) {
      return true;
    }
    throw err;
  }
}

function inOrder(states) {
  const ranks = states.map((s) => ORDER.indexOf(s));
  return ranks.every((rank, i) => rank >= 0 && (i === 0 || rank >= ranks[i - 1]));
}

async function main(summary) {
  const base = env("API_URL");
  const token = env("API_TOKEN");
  const secret = env("CALLBACK_SECRET");
  const videoUrl = env("VIDEO_URL");
  const aspectRatio = env("ASPECT_RATIO", "9:16");
  const host = env("CALLBACK_HOST", "127.0.0.1");
  const idempotencyKey = env("IDEMPOTENCY_KEY", `node-${randomUUID()}`);
  const timeoutMs = Number(env("TIMEOUT_S", "120")) * 1000;
  const signal = AbortSignal.timeout(timeoutMs);

  const check = (name, ok, detail) => {
    summary.checks[name] = ok;
    if (!ok) {
      summary.failures.push(detail === undefined ? name : `${name}: ${detail}`);
    }
  };

  const receiver = await startReceiver(host);
  try {
    // enqueue, then the same request again: the same job (Idempotency-Key), 200 instead of 201
    const job = { video_url: videoUrl, aspect_ratio: aspectRatio, callback_url: receiver.url, metadata: { client: "node" } };
    const headers = { "Idempotency-Key": idempotencyKey };
    const created = await api(base, token, "POST", "/v1/jobs", { body: job, headers, signal });
    if (created.status !== 201) {
      throw new Error(`enqueue: HTTP ${created.status}: ${JSON.stringify(created.json)}`);
    }
    const jobId = created.json.id;
    summary.job_id = jobId;
    summary.location = created.headers.get("location");
    const again = await api(base, token, "POST", "/v1/jobs", { body: job, headers, signal });
    check("idempotent_repeat", again.status === 200 && again.json.id === jobId, `HTTP ${again.status}`);

    // follow the job's events to the end, and wait for its callback within the same deadline
    const timedOut = new Promise((_, reject) => {
      signal.addEventListener("abort", () => reject(new Error("no callback before the deadline")));
    });
    const [events, delivery] = await Promise.all([
      followEvents(base, token, jobId, signal),
      Promise.race([receiver.first, timedOut]),
    ]);
    const states = events.states.map((e) => e.state);
    summary.sse = { states, end: events.end, event_ids: events.states.map((e) => e.id) };
    check("sse_states_in_order", inOrder(states), states.join(" "));
    check("sse_end_succeeded", events.end.state === "SUCCEEDED", JSON.stringify(events.end));
    check("sse_last_state_terminal", TERMINAL.has(states.at(-1)), states.at(-1));

    // the callback: verify with the library; a tampered body, another secret, a moved timestamp fail
    const body = delivery.body.toString("utf8");
    const signed = {
      "webhook-id": delivery.headers["webhook-id"],
      "webhook-timestamp": delivery.headers["webhook-timestamp"],
      "webhook-signature": delivery.headers["webhook-signature"],
    };
    let payload = null;
    try {
      payload = new Webhook(secret).verify(body, signed);
    } catch (err) {
      summary.verify_error = String(err);
    }
    summary.callback = {
      webhook_id: signed["webhook-id"],
      signatures: (signed["webhook-signature"] ?? "").split(" ").filter(Boolean).length,
      verified: payload !== null,
      payload,
      raw: { headers: signed, body }, // so another library can check the same bytes
    };
    check("callback_verified", payload !== null, summary.verify_error);
    check("callback_is_this_job", payload?.job_id === jobId && payload?.state === "SUCCEEDED");
    const otherSecret = `whsec_${Buffer.from("a secret this receiver was never given").toString("base64")}`;
    const movedTimestamp = String(Number(signed["webhook-timestamp"]) + 1);
    summary.tamper = {
      body_rejected: rejects(secret, body.replace("SUCCEEDED", "FAILED"), signed),
      other_secret_rejected: rejects(otherSecret, body, signed),
      timestamp_rejected: rejects(secret, body, { ...signed, "webhook-timestamp": movedTimestamp }),
    };
    check("tamper_rejected", Object.values(summary.tamper).every(Boolean), JSON.stringify(summary.tamper));

    // the job as the API has it now
    const final = await api(base, token, "GET", `/v1/jobs/${jobId}`, { signal });
    summary.job = final.json;
    check("job_succeeded", final.status === 200 && final.json.state === "SUCCEEDED", `HTTP ${final.status}`);
    summary.callbacks_received = receiver.deliveries.length;
  } finally {
    receiver.close();
  }
}

// One summary whatever happens: a thrown error (HTTP, deadline, configuration) is a failure too.
const summary = { ok: false, checks: {}, failures: [] };
try {
  await main(summary);
} catch (err) {
  summary.failures.push(String(err?.stack ?? err));
}
summary.ok = summary.failures.length === 0 && Object.keys(summary.checks).length > 0;
process.stdout.write(`${JSON.stringify(summary)}\n`);
process.exitCode = summary.ok ? 0 : 1;
