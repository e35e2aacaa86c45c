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
 * - temperature, max tokens, model and API key persist in localStorage; the key is sent as a Bearer token.
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
};
const SAVED = ["temperature", "maxTokens", "apiKey", "model"]; // ui fields kept in localStorage

const messages = []; // {role: "user" | "assistant", content: string, finish?: string}
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
  if (message.role === "assistant") body.append(renderMarkdown(message.content));
  else body.textContent = message.content;
  view.append(body);
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

function requestBody() {
  const body = { messages: messages.map(({ role, content }) => ({ role, content })), stream: true };
  if (ui.model.value) body.model = ui.model.value; // none yet (the model list failed): the served one
  const temperature = parseFloat(ui.temperature.value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

/* Streams the assistant's reply to the conversation as it stands into a new message. */
async function complete() {
  clearError();
  editing = -1; // an open editor would otherwise stay open, and sendable, during the stream
  const body = requestBody();
  const reply = { role: "assistant", content: "" };
  messages.push(reply);
  const controller = new AbortController();
  streaming = controller;
  render();
  const view = ui.messages.lastElementChild.querySelector(".body");
  view.classList.add("pending");
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
      if (choice.delta && choice.delta.content) {
        const follow = nearBottom();
        reply.content += choice.delta.content;
        view.replaceChildren(renderMarkdown(reply.content));
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
    if (reply.content === "" && at >= 0) messages.splice(at, 1); // nothing came: offer Retry
    render();
  }
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

ui.apiKey.addEventListener("change", () => {
  clearError();
  loadModels().catch((err) => showError(err.message));
});

loadModels().catch((err) => showError(err.message));
render();
