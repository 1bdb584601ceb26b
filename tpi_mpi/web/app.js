// tpi_mpi's page: a chat over /v1/chat/completions (server-sent events) and the cluster's state
// from /cluster, polled every 2 s. Plain JS, no build step. Model text and server strings are only
// ever set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const history = [];          // the conversation sent with each request: {role, content}
let controller = null;       // the running request's AbortController (the Stop button)

// --- the API key (kept in this browser only) ---------------------------------------------------

$("api-key").value = localStorage.getItem("tpi_mpi.key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("tpi_mpi.key", $("api-key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// --- the chat -------------------------------------------------------------------------------------

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  $("chat-log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// The text of each event of a server-sent event stream as it arrives; returns at [DONE] or the end.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = pending.indexOf("\n\n")) >= 0) {
      const event = pending.slice(0, cut);
      pending = pending.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  const question = bubble("user", text);
  const answer = bubble("assistant streaming", "");
  controller = new AbortController();
  busy(true);
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        messages: history, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        answer.textContent = reply;
        answer.scrollIntoView({ block: "end" });
      }
    }
    answer.dataset.done = "true";
  } catch (e) {
    if (e.name === "AbortError") {
      answer.dataset.done = "stopped";
    } else {
      bubble("error", String(e.message || e));
      answer.dataset.done = "error";
    }
  } finally {
    answer.classList.remove("streaming");
    if (reply) history.push({ role: "assistant", content: reply });
    else if (answer.dataset.done !== "true") {      // no answer: the question is not part of the conversation
      answer.remove();
      history.pop();
      question.classList.add("unsent");
    }
    controller = null;
    busy(false);
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("chat-log").replaceChildren();
});

// --- the cluster ----------------------------------------------------------------------------------

const MiB = 1024 * 1024;
const mib = (bytes) => (bytes == null ? "-" : (bytes / MiB).toFixed(0) + " MiB");
let previous = null;         // the last poll's {at, generated}: tokens/s between two polls

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text == null ? "-" : String(text);
  row.appendChild(td);
}

function showRanks(s) {
  const engine = s.engine || {};
  const rows = [];
  for (let r = 0; r < s.ranks; r++) {
    const tr = document.createElement("tr");
    cell(tr, r);
    cell(tr, (s.hosts || engine.hosts || [])[r]);     // the supervisor's device names, else each rank's own
    cell(tr, s.pids[r]);
    cell(tr, s.windows ? s.windows[r] : null);
    cell(tr, engine.resident ? engine.resident[r] : null);
    cell(tr, engine.rss_bytes ? mib(engine.rss_bytes[r]) : null);
    cell(tr, engine.peak_rss_bytes ? mib(engine.peak_rss_bytes[r]) : null);
    rows.push(tr);
  }
  $("rank-table").tBodies[0].replaceChildren(...rows);
}

function show(s) {
  const status = $("status");
  status.textContent = s.status;
  status.className = "badge " + s.status;
  $("model").textContent = s.model;
  $("ranks").textContent = s.ranks;
  $("allreduce").textContent = s.allreduce || "-";
  $("batch").textContent = s.running + " of " + s.max_batch;
  $("occupancy").value = s.max_batch ? s.running / s.max_batch : 0;
  $("queued").textContent = s.queued;
  const engine = s.engine || {};
  if (engine.kv_blocks_total) {
    $("kv").textContent = engine.kv_blocks_used + " of " + engine.kv_blocks_total;
    $("kv-meter").value = engine.kv_blocks_used / engine.kv_blocks_total;
  }
  const now = performance.now();
  if (previous) {
    const rate = (s.generated_tokens - previous.generated) / ((now - previous.at) / 1000);
    $("tokens-per-s").textContent = rate.toFixed(1);
  }
  previous = { at: now, generated: s.generated_tokens };
  $("tokens").textContent = s.prompt_tokens + " prompt, " + s.generated_tokens + " generated";
  $("requests").textContent = Object.entries(s.requests).filter(([, n]) => n).map(([k, n]) => k + " " + n).join(", ") || "none";
  $("restarts").textContent = s.restarts;
  const f = s.last_failure;
  $("last-failure").textContent = f
    ? new Date(f.at * 1000).toLocaleTimeString() + ": " + f.message +
      (f.recovery_s != null ? " (serving again after " + f.recovery_s + " s)" : "")
    : "none";
  showRanks(s);
}

async function poll() {
  try {
    const response = await fetch("/cluster", { headers: headers() });
    if (response.status === 401) {
      $("status").textContent = "API key needed";
      $("status").className = "badge failed";
    } else {
      show(await response.json());   // 503 carries the same body (status "failed")
    }
  } catch (e) {
    $("status").textContent = "unreachable";
    $("status").className = "badge failed";
  }
  setTimeout(poll, POLL_MS);
}
poll();
