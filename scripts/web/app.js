// The chat page of scripts/serve_openai_api.py: it talks to the same server's OpenAI-compatible API (/v1), streams
// each reply, and shows it as Markdown (markdown.js: DOM nodes and text, never raw HTML). The thinking of a reasoning
// model (delta.reasoning_content) is shown dimmed and collapsible, tool calls as boxes, tokens/s after each reply.
// The history lives in this tab only; the API key (when the server has one) in sessionStorage, sent as a Bearer
// token and never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "minimind-api-key";  // the sessionStorage entry: forgotten when the tab closes

const chat = {
  history: [],       // the turns sent with the next request: {role, content[, tool_calls]}
  model: undefined,  // the id /v1/models reports, sent as "model"
  busy: null,        // the AbortController of the reply being streamed
};

class ApiError extends Error {}

// ---------------------------------------------------------------------------------------------------------------
// the API

/** fetch ``v1/<path>`` with the key; a 401 asks the user for the key, any non-2xx throws the server's message. */
async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(`v1/${path}`, {...options, headers});  // relative: works behind a path prefix too
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error.message || message;
  } catch { /* not an OpenAI-style error body: keep the status line */ }
  if (response.status === 401) askForKey();
  throw new ApiError(message);
}

function askForKey() {
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
}

$("key-dialog").addEventListener("close", () => {
  const key = $("key-input").value.trim();
  $("key-input").value = "";
  if (key) {
    sessionStorage.setItem(KEY, key);
    loadModel();
  }
});

/** Show the model's name and size, and let max tokens go up to what the server allows. */
async function loadModel() {
  try {
    const model = (await (await api("models")).json()).data[0];
    chat.model = model.id;
    let size = "";
    if (model.parameters) {
      size = ` · ${millions(model.parameters)}`;
      if (model.active_parameters && model.active_parameters !== model.parameters) {
        size += `-A${millions(model.active_parameters)}`;  // MoE: total-Active, as MiniMind writes it
      }
      size += " params";
    }
    $("model").textContent = model.id + size;
    if (model.max_tokens) {
      $("max-tokens").max = model.max_tokens;
      $("max-tokens").value = Math.min(Number($("max-tokens").value), model.max_tokens);
    }
  } catch (e) {
    $("model").textContent = e instanceof ApiError ? e.message : "server unreachable";
  }
}

const millions = (n) => `${(n / 1e6).toFixed(2)}M`;

/** The data of each server-sent event of a streamed reply, parsed, up to ``data: [DONE]``. */
async function* serverEvents(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();  // rejects with an AbortError when the user stops the reply
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    for (let end; (end = buffer.indexOf("\n\n")) >= 0; buffer = buffer.slice(end + 2)) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// one reply on the page

class Reply {
  constructor() {
    this.bubble = addMessage("assistant");
    this.reasoning = "";
    this.content = "";
    this.toolCalls = [];  // accumulated by index, as OpenAI streams them
    this.usage = null;
    this.chunks = 0;
    this.started = performance.now();
    this.firstChunk = null;
    this.answer = this.bubble.appendChild(document.createElement("div"));
    this.answer.className = "answer";
    this.pending = false;
  }

  /** Take one chunk of the stream: a delta of thinking, answer or tool calls, the usage, or an error. */
  take(event) {
    if (event.error) throw new ApiError(event.error.message || "the server failed mid-reply");
    this.firstChunk ??= performance.now();
    if (event.usage) this.usage = event.usage;
    const delta = event.choices?.[0]?.delta;
    if (!delta) return;
    this.chunks++;
    this.reasoning += delta.reasoning_content || "";
    this.content += delta.content || "";
    for (const call of delta.tool_calls || []) {
      const known = (this.toolCalls[call.index ?? this.toolCalls.length] ??= {
        id: call.id, type: "function", function: {name: "", arguments: ""}});
      known.function.name += call.function?.name || "";
      known.function.arguments += call.function?.arguments || "";
    }
    if (!this.pending) {  // re-render at most once a frame: a long reply re-parsed per token would crawl
      this.pending = true;
      requestAnimationFrame(() => this.render());
    }
  }

  render() {
    this.pending = false;
    const follow = atBottom();  // keep following the reply, unless the user scrolled up to read
    if (this.reasoning) {
      if (!this.thinking) {
        this.thinking = document.createElement("details");
        this.thinking.className = "thinking";
        this.thinking.open = true;
        this.thinking.append(document.createElement("summary"), document.createElement("div"));
        this.bubble.prepend(this.thinking);
      }
      this.thinking.lastChild.textContent = this.reasoning.trim();
      const thought = this.done || this.content || this.toolCalls.length;
      this.thinking.firstChild.textContent = thought ? "Thought" : "Thinking…";
      if (this.content && !this.folded) {  // fold it once, when the answer begins; the user may open it again
        this.thinking.open = false;
        this.folded = true;
      }
    }
    this.answer.replaceChildren(renderMarkdown(this.content));
    if (this.toolCalls.length) {
      const boxes = this.toolCalls.map((call) => {
        const box = document.createElement("div");
        box.className = "tool-call";
        box.append(document.createElement("div"), document.createElement("pre"));
        box.firstChild.textContent = `tool call: ${call.function.name}`;
        box.lastChild.textContent = prettyJson(call.function.arguments);
        return box;
      });
      (this.tools ??= this.bubble.appendChild(document.createElement("div"))).replaceChildren(...boxes);
    }
    if (follow) scrollDown();
  }

  /** The stats line: real token counts when the server sent usage, else chunks (the stream was cut short). */
  finish(note) {
    this.done = true;
    this.render();
    const seconds = (performance.now() - (this.firstChunk ?? this.started)) / 1000;
    const perSecond = (n) => (n / Math.max(seconds, 1e-3)).toFixed(1);
    const {completion_tokens: tokens, prompt_tokens: prompt} = this.usage || {};
    const parts = this.usage ? [`${tokens} tokens`, `${perSecond(tokens)} tok/s`, `prompt ${prompt} tokens`]
                             : [`${this.chunks} chunks`, `${perSecond(this.chunks)} chunks/s`];
    if (note) parts.push(note);
    this.addLine("stats", parts.join(" · "));
  }

  fail(message) {
    this.done = true;
    this.render();
    this.addLine("error", message);
  }

  /** A line of text under the reply: its stats or its error. */
  addLine(className, text) {
    const follow = atBottom();
    const line = this.bubble.appendChild(document.createElement("div"));
    line.className = className;
    line.textContent = text;
    if (follow) scrollDown();
  }

  /** The turn as it goes back into the history: the answer and its tool calls; the thinking stays out. */
  message() {
    const turn = {role: "assistant", content: this.content};
    if (this.toolCalls.length) turn.tool_calls = this.toolCalls;
    return turn;
  }
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function addMessage(role) {
  $("empty").hidden = true;
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  $("messages").append(bubble);
  scrollDown();
  return bubble;
}

function atBottom() {
  const pane = $("messages");
  return pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;
}

function scrollDown() {
  const pane = $("messages");
  pane.scrollTop = pane.scrollHeight;
}

// ---------------------------------------------------------------------------------------------------------------
// sending, stopping, clearing

/** The request body: the system prompt, the history and the knobs. Throws on a tools field that is not JSON. */
function request(messages) {
  const system = $("system").value.trim();
  const body = {
    model: chat.model,
    messages: system ? [{role: "system", content: system}, ...messages] : messages,
    stream: true,
    stream_options: {include_usage: true},  // the last chunk carries the token counts
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    chat_template_kwargs: {open_thinking: $("thinking").checked},
  };
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (e) {
      throw new ApiError(`Tools is not valid JSON: ${e.message}`);
    }
  }
  return body;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || chat.busy) return;
  $("prompt").value = "";
  resizePrompt();
  addMessage("user").textContent = text;  // the user's words as typed: text, never Markdown or HTML
  const turn = {role: "user", content: text};
  const history = chat.history;  // Clear starts a new one: a reply stopped by Clear lands in the old one
  const reply = new Reply();
  setBusy(new AbortController());
  try {
    const body = JSON.stringify(request([...history, turn]));
    const response = await api("chat/completions", {method: "POST", body, signal: chat.busy.signal});
    for await (const event of serverEvents(response)) reply.take(event);
    reply.finish();
    history.push(turn, reply.message());
  } catch (e) {
    if (e.name === "AbortError") {  // Stop: the connection closes and the server stops generating
      reply.finish("stopped");
      history.push(turn, reply.message());
    } else {
      // fetch says TypeError when the connection fails or breaks off mid-reply. The turn stays out of the history.
      const lost = e instanceof TypeError && `connection to the server lost (${e.message})`;
      reply.fail(e instanceof ApiError ? e.message : lost || `${e.name}: ${e.message}`);
    }
  } finally {
    setBusy(null);
  }
}

function setBusy(controller) {
  chat.busy = controller;
  $("send").hidden = Boolean(controller);
  $("stop").hidden = !controller;
}

function clearChat() {
  chat.busy?.abort();
  chat.history = [];
  $("messages").replaceChildren($("empty"));
  $("empty").hidden = false;
  $("prompt").focus();
}

function resizePrompt() {  // grow with the text, up to a third of the window
  const prompt = $("prompt");
  prompt.style.height = "auto";
  prompt.style.height = `${Math.min(prompt.scrollHeight, window.innerHeight / 3)}px`;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a newline; Enter that confirms an input method's candidate (Chinese) is neither.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$("prompt").addEventListener("input", resizePrompt);
$("stop").addEventListener("click", () => chat.busy?.abort());
$("clear").addEventListener("click", clearChat);
for (const id of ["temperature", "top-p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
if (window.matchMedia("(max-width: 720px)").matches) $("settings").open = false;  // a phone: the chat first
loadModel();
