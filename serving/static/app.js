/*
 * The chat page: the conversation, streaming replies from /v1/chat/completions, and the controls.
 *
 * Notable:
 * - the conversation is `messages` (OpenAI's {role, content}) and the page is redrawn from it; while a
 *   reply streams only that reply's body is redrawn, once per chunk, from the whole text so far.
 * - streaming reads the SSE events ("data: {chunk}" ... "data: [DONE]") from fetch's ReadableStream by
 *   hand: EventSource cannot POST. Stop aborts the fetch; the server sees the disconnect and cancels.
 * - regenerate drops the last reply and asks again; editing user message i keeps what came before it,
 *   replaces it and asks again: everything after it is gone, as in ChatGPT.
 * - model text only ever goes through renderMarkdown (markdown.js), which makes Text nodes and plain
 *   elements; user text is a Text node. Nothing from the server or the user is parsed as HTML.
 * - a reply that called the calculator keeps its parts (the server's content_parts: text, the call, the
 *   output, in order): the call and its output show as a collapsible block between the texts, and the
 *   parts go back to the server with the message, so the next turn renders them as the model wrote them.
 * - "Show log-probabilities" asks for each token's log-probability and its 5 likeliest alternatives, and
 *   shows the reply's tokens under it, shaded the less likely they were, with the numbers in a tooltip.
 * - temperature, max tokens, the log-probabilities switch, model, API key and system prompt persist in
 *   localStorage; the key is sent as a Bearer token, the system prompt (when not blank) as the first message
 *   of every request, never shown in the conversation.
 * - errors (an HTTP error in OpenAI's shape, an error event inside the stream, a dropped connection)
 *   show in #error, with Retry-After when the server is overloaded.
 */
"use strict";

const ui = {
  messages: document.getElementById("messages"),
  error: document.getElementById("error"),
  form: document.getElementById("composer"),
  prompt: document.getElementById("prompt"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  newChat: document.getElementById("new-chat"),
  model: document.getElementById("model"),
  temperature: document.getElementById("temperature"),
  maxTokens: document.getElementById("max-tokens"),
  apiKey: document.getElementById("api-key"),
  logprobs: document.getElementById("logprobs"),
  systemPrompt: document.getElementById("system-prompt"),
};
const SAVED = ["temperature", "maxTokens", "apiKey", "model", "systemPrompt"]; // ui fields kept in localStorage
const TOP_LOGPROBS = 5;

// {role: "user" | "assistant", content: string, finish?: string, and for a reply: parts: [{type, text}]
// (content_parts: text, python, python_output) and, when asked for, logprobs: [{token, logprob, top_logprobs}]}
const messages = [];
let streaming = null; // the AbortController of the reply being streamed
let editing = -1; // index of the user message open for editing

// ---------------------------------------------------------------------------------------------
// settings

function stored(name) {
  try {
    return localStorage.getItem("nanochat." + name);
  } catch {
    return null; // storage disabled: settings just do not persist
  }
}

function store(name, value) {
  try {
    localStorage.setItem("nanochat." + name, value);
  } catch {
    // as above
  }
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function loadModels() {
  const res = await fetch("/v1/models", { headers: authHeaders() });
  if (!res.ok) throw new Error(await errorText(res));
  const ids = ((await res.json()).data || []).map((m) => String(m.id));
  const wanted = ui.model.value || stored("model");
  ui.model.replaceChildren(
    ...ids.map((id) => {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      return option;
    }),
  );
  if (ids.includes(wanted)) ui.model.value = wanted;
}

// ---------------------------------------------------------------------------------------------
// drawing

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function editor(i) {
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = messages[i].content;
  area.setAttribute("aria-label", "Edit message");
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(
    button("Save & send", () => {
      const text = area.value.trim();
      if (!text || streaming) return;
      messages.splice(i, messages.length - i, { role: "user", content: text });
      complete();
    }),
    button("Cancel", () => {
      editing = -1;
      render();
    }),
  );
  return [area, actions];
}

const FINISH_NOTES = new Map([["length", "stopped at the max tokens limit"], ["stopped", "stopped"]]);

function hasToolParts(message) {
  return (message.parts || []).some((part) => part.type !== "text");
}

/* A calculator call and its output (output may be missing: a call the calculator refused). */
function toolView(call, output) {
  const block = document.createElement("details");
  block.className = "tool";
  block.open = Boolean(call.open);
  block.addEventListener("toggle", () => { call.open = block.open; }); // survives redraws
  const summary = document.createElement("summary");
  summary.textContent = "Calculator: " + call.text + (output ? " = " + output.text : "");
  block.append(summary);
  for (const [label, part] of [["call", call], ["output", output]]) {
    if (!part) continue;
    const row = document.createElement("div");
    row.className = "tool-" + label;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const code = document.createElement("code");
    code.textContent = part.text;
    row.append(name, code);
    block.append(row);
  }
  return block;
}

/* A reply's body: its text as markdown, with each calculator call (and its output) as a block in place. */
function replyNodes(message) {
  if (!hasToolParts(message)) return [renderMarkdown(message.content)];
  const nodes = [];
  const parts = message.parts;
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i];
    if (part.type === "text") nodes.push(renderMarkdown(part.text));
    else if (part.type === "python") {
      const output = parts[i + 1] && parts[i + 1].type === "python_output" ? parts[++i] : null;
      nodes.push(toolView(part, output));
    } else nodes.push(toolView({ text: "", open: part.open }, part)); // an output with no call before it
  }
  return nodes;
}

function percent(logprob) {
  return (100 * Math.exp(logprob)).toFixed(1) + "%";
}

/* The reply's tokens, shaded by how likely the model found each, the numbers in a tooltip. */
function logprobsView(message) {
  const view = document.createElement("div");
  view.className = "logprobs";
  view.setAttribute("aria-label", "Tokens and their probabilities");
  for (const entry of message.logprobs) {
    const token = document.createElement("span");
    const p = Math.exp(entry.logprob);
    // 5 shades, as classes: the page's CSP allows no inline style
    token.className = "token p" + Math.min(4, Math.floor(p * 5)) + (entry.bytes === null ? " special" : "");
    token.textContent = entry.token;
    token.dataset.logprob = String(entry.logprob);
    const others = (entry.top_logprobs || []).map((t) => `${JSON.stringify(t.token)} ${percent(t.logprob)}`);
    token.title = `${JSON.stringify(entry.token)}: ${percent(entry.logprob)} (logprob ${entry.logprob.toFixed(3)})` +
      (others.length ? "\nlikeliest: " + others.join(", ") : "");
    view.append(token);
  }
  return view;
}

function fillReply(view, message) {
  view.querySelector(".body").replaceChildren(...replyNodes(message));
  const old = view.querySelector(".logprobs");
  const fresh = message.logprobs ? logprobsView(message) : null;
  if (old && fresh) old.replaceWith(fresh);
  else if (old) old.remove();
  else if (fresh) view.querySelector(".body").after(fresh);
}

function messageView(message, i) {
  const view = document.createElement("article");
  view.className = "message " + message.role;
  if (i === editing) {
    view.classList.add("editing");
    view.append(...editor(i));
    return view;
  }
  const body = document.createElement("div");
  body.className = "body";
  view.append(body);
  if (message.role === "assistant") fillReply(view, message);
  else body.textContent = message.content;
  if (FINISH_NOTES.has(message.finish)) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = FINISH_NOTES.get(message.finish);
    view.append(note);
  }
  if (!streaming) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const last = i === messages.length - 1;
    if (message.role === "user") actions.append(button("Edit", () => { editing = i; render(); }));
    if (last && message.role === "assistant") actions.append(button("Regenerate", regenerate));
    if (last && message.role === "user") actions.append(button("Retry", regenerate)); // after an error
    view.append(actions);
  }
  return view;
}

function render() {
  ui.messages.replaceChildren(...messages.map(messageView));
  ui.send.hidden = streaming !== null;
  ui.stop.hidden = streaming === null;
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
}

// ---------------------------------------------------------------------------------------------
// talking to the server

async function errorText(res) {
  let message = res.statusText || "request failed";
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: the status line says enough
  }
  let text = `${res.status}: ${message}`;
  const retry = res.headers.get("Retry-After");
  if (retry) text += ` (the server is busy: retry in ${retry} s)`;
  if (res.status === 401) text += " (set the API key in Settings)";
  return text;
}

/* The data of each server-sent event in a byte stream, as strings. */
async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = events.pop(); // an incomplete event waits for the next read
      for (const event of events) {
        const data = event
          .split(/\r\n|\n|\r/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (data) yield data; // comment lines (": keep-alive") carry none
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // after [DONE] or an error: let the connection go
  }
}

/* A message as the API takes it: a reply that called the calculator goes back with its parts. */
function apiMessage(message) {
  const sent = { role: message.role, content: message.content };
  if (hasToolParts(message)) sent.content_parts = message.parts.map(({ type, text }) => ({ type, text }));
  return sent;
}

function requestBody() {
  const system = ui.systemPrompt.value.trim();
  const leading = system ? [{ role: "system", content: system }] : [];
  const body = { messages: leading.concat(messages.map(apiMessage)), stream: true };
  if (ui.model.value) body.model = ui.model.value; // none yet (the model list failed): the served one
  const temperature = parseFloat(ui.temperature.value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  if (ui.logprobs.checked) {
    body.logprobs = true;
    body.top_logprobs = TOP_LOGPROBS;
  }
  return body;
}

/* Streams the assistant's reply to the conversation as it stands into a new message. */
async function complete() {
  clearError();
  editing = -1; // an open editor would otherwise stay open, and sendable, during the stream
  const body = requestBody();
  const reply = { role: "assistant", content: "", parts: [] };
  if (body.logprobs) reply.logprobs = [];
  messages.push(reply);
  const controller = new AbortController();
  streaming = controller;
  render();
  const view = ui.messages.lastElementChild;
  view.querySelector(".body").classList.add("pending");
  window.scrollTo(0, document.documentElement.scrollHeight);
  let done = false;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") {
        done = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      const choice = (chunk.choices || [])[0]; // none in the final usage chunk
      if (!choice) continue;
      const follow = nearBottom();
      if (addDelta(reply, choice)) {
        fillReply(view, reply);
        if (follow) window.scrollTo(0, document.documentElement.scrollHeight);
      }
      if (choice.finish_reason) reply.finish = choice.finish_reason;
    }
    if (!done) throw new Error("the connection closed before the reply was complete");
  } catch (err) {
    if (err.name === "AbortError") reply.finish = "stopped";
    else showError(err.message || String(err));
  } finally {
    if (streaming === controller) streaming = null;
    const at = messages.indexOf(reply); // -1 when New chat cleared the conversation meanwhile
    if (reply.content === "" && !reply.parts.length && at >= 0) messages.splice(at, 1); // nothing came: offer Retry
    render();
  }
}

/* Adds a chunk's delta and log-probabilities to the reply; whether anything changed. Text extends the last
 * part if it is text, else starts one; a calculator piece goes to the part its index names. */
function addDelta(reply, choice) {
  const delta = choice.delta || {};
  let changed = false;
  if (delta.content) {
    reply.content += delta.content;
    const last = reply.parts[reply.parts.length - 1];
    if (last && last.type === "text") last.text += delta.content;
    else reply.parts.push({ type: "text", text: delta.content });
    changed = true;
  }
  for (const piece of delta.content_parts || []) {
    if (!reply.parts[piece.index]) reply.parts[piece.index] = { type: piece.type, text: "" };
    reply.parts[piece.index].text += piece.text;
    changed = true;
  }
  const logprobs = choice.logprobs && choice.logprobs.content;
  if (reply.logprobs && logprobs && logprobs.length) {
    reply.logprobs.push(...logprobs);
    changed = true;
  }
  return changed;
}

function regenerate() {
  if (streaming) return;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  complete();
}

// ---------------------------------------------------------------------------------------------
// wiring

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || streaming) return;
  // roles must alternate: a message left unanswered by an error is replaced by the new one
  if (messages.length && messages[messages.length - 1].role === "user") messages.pop();
  messages.push({ role: "user", content: text });
  ui.prompt.value = "";
  complete();
});

// Enter sends and Shift+Enter breaks the line; on touch screens, with no Shift, Enter breaks the line
const enterSends = !window.matchMedia("(pointer: coarse)").matches;
ui.prompt.addEventListener("keydown", (event) => {
  if (enterSends && event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => streaming && streaming.abort());

ui.newChat.addEventListener("click", () => {
  if (streaming) streaming.abort();
  streaming = null;
  messages.length = 0;
  editing = -1;
  clearError();
  render();
  ui.prompt.focus();
});

for (const name of SAVED) {
  const value = stored(name);
  if (value !== null && name !== "model") ui[name].value = value; // the model waits for its option
  ui[name].addEventListener("change", () => store(name, ui[name].value));
}

ui.logprobs.checked = stored("logprobs") === "true";
ui.logprobs.addEventListener("change", () => store("logprobs", String(ui.logprobs.checked)));

ui.apiKey.addEventListener("change", () => {
  clearError();
  loadModels().catch((err) => showError(err.message));
});

loadModels().catch((err) => showError(err.message));
render();
