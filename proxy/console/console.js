// Tollway test console: pick an operation of the gateway's APIs, send a request, watch the
// reply (streamed events as they arrive) and its token usage.
//
// Served by the gateway (proxy/console.py) with `Content-Security-Policy: default-src 'self'`:
// no inline script or style, nothing from another origin. Everything that comes from the
// network is rendered with textContent, never as markup. Keys never go into a URL or the
// browser's console; the admin key is kept in this tab's sessionStorage only.
//
// Paths are relative to the page (`openapi.json`, `admin/...`, `./<api path>`), so the console
// also works when a reverse proxy mounts the gateway under a prefix.

const RESERVED = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/console", "/admin"];
const VERBS = ["get", "post", "put", "patch", "delete", "head", "options"];
const STAMP = ["x-request-id", "x-tollway-overhead-ms"];
const DEFAULT_KEY_HEADER = "Ocp-Apim-Subscription-Key";
const ADMIN_STORAGE = "tollway.console.admin-key";
// Response headers shown in "Token usage" even when /openapi.json does not name them.
const LIMIT_LIKE = /ratelimit|quota|tokens|retry-after/i;
const MASK = "••••••••";

// The reference's sample body (APIM "Test the LLM API") and its siblings, per operation.
const SAMPLES = {
  "chat-completions": {
    model: "gpt-4o-mini",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "How are you?" },
    ],
    max_tokens: 50,
  },
  completions: { model: "gpt-4o-mini", prompt: "Say this is a test.", max_tokens: 50 },
  embeddings: {
    model: "text-embedding-3-small",
    input: "The food was delicious and the waiter was friendly.",
  },
  responses: {
    model: "gpt-4o-mini",
    instructions: "You are a helpful assistant.",
    input: "How are you?",
    max_output_tokens: 50,
  },
};
const REASONS = {
  200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
  401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
  409: "Conflict", 413: "Content Too Large", 429: "Too Many Requests",
  500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
  504: "Gateway Timeout",
};

const $ = (id) => document.getElementById(id);
const state = {
  operations: new Map(), // id -> operation (see describeOperation)
  current: null,
  bodies: new Map(), // operation id -> the body text the user left there
  controller: null, // the AbortController of the request in flight
};

// --- small DOM helpers (text only) ----------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("aria-") || name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
}

function storage() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // storage disabled: the admin key is simply not remembered
  }
}

// --- the gateway's description -> operations ------------------------------------------------

function reserved(path) {
  return RESERVED.some((p) => path === p || path.startsWith(p + "/"));
}

function keyHeaderOf(op, schemes) {
  for (const requirement of op.security ?? []) {
    for (const name of Object.keys(requirement)) {
      const scheme = schemes[name];
      if (scheme && scheme.type === "apiKey" && scheme.in === "header") return scheme.name;
    }
  }
  return DEFAULT_KEY_HEADER;
}

function headerNames(response) {
  return Object.keys(response?.headers ?? {}).filter(
    (name) => !STAMP.includes(name.toLowerCase()) && name.toLowerCase() !== "allow",
  );
}

function describeOperation(path, item, verbs, schemes) {
  const first = item[verbs[0]];
  const wildcard = path.includes("{path}");
  const id = wildcard ? `${first.tags?.[0] ?? path}.passthrough` : first.operationId ?? path;
  const ok = first.responses?.["200"];
  const retry = ["403", "429", "503"].flatMap((s) => headerNames(first.responses?.[s]));
  return {
    id,
    api: first.tags?.[0] ?? "",
    kind: wildcard ? "passthrough" : id.slice(id.lastIndexOf(".") + 1),
    path,
    wildcard,
    methods: verbs.map((v) => v.toUpperCase()),
    summary: wildcard ? "Any subpath, any verb, relayed to the backend" : first.summary ?? "",
    keyHeader: keyHeaderOf(first, schemes),
    keyRequired: (first.security ?? []).length > 0,
    streams: Boolean(ok?.content?.["text/event-stream"]),
    body: Boolean(first.requestBody),
    limitHeaders: headerNames(ok),
    retryHeaders: [...new Set(["Retry-After", ...retry])],
  };
}

function operationsOf(doc) {
  const schemes = doc.components?.securitySchemes ?? {};
  const out = [];
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    if (reserved(path)) continue;
    const verbs = VERBS.filter((verb) => item[verb]);
    if (verbs.length === 0) continue;
    if (path.includes("{path}")) out.push(describeOperation(path, item, verbs, schemes));
    else for (const verb of verbs) out.push(describeOperation(path, item, [verb], schemes));
  }
  return out;
}

function renderApis(doc, operations) {
  const list = $("api-list");
  list.replaceChildren();
  const byApi = new Map();
  for (const op of operations) {
    if (!byApi.has(op.api)) byApi.set(op.api, []);
    byApi.get(op.api).push(op);
  }
  const tags = new Map((doc.tags ?? []).map((tag) => [tag.name, tag]));
  for (const [api, ops] of byApi) {
    const headingId = `api-${api}`;
    const section = el("section", { class: "api", "aria-labelledby": headingId });
    section.append(el("h3", { id: headingId, text: api }));
    const description = tags.get(api)?.description;
    if (description) section.append(el("p", { class: "muted small", text: description }));
    const items = el("ul", { class: "operations" });
    for (const op of ops) {
      const button = el(
        "button",
        { type: "button", class: "operation", "data-operation": op.id },
        el("span", { class: `verb verb-${op.wildcard ? "any" : op.methods[0].toLowerCase()}`,
                     text: op.wildcard ? "ANY" : op.methods[0] }),
        el("span", { class: "op-text" },
           el("span", { class: "op-summary", text: op.summary }),
           el("span", { class: "op-path", text: op.path })),
      );
      button.addEventListener("click", () => selectOperation(op.id, true));
      items.append(el("li", {}, button));
    }
    section.append(items);
    list.append(section);
  }
}

async function loadDescription() {
  let doc;
  try {
    const response = await fetch("openapi.json", { cache: "no-store", credentials: "omit" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    doc = await response.json();
  } catch (error) {
    $("load-status").textContent = `Could not read the gateway's /openapi.json: ${error.message}`;
    $("load-status").className = "error-text";
    return;
  }
  const operations = operationsOf(doc);
  for (const op of operations) state.operations.set(op.id, op);
  renderApis(doc, operations);
  const apis = new Set(operations.map((op) => op.api)).size;
  const title = doc.info?.version ? `Tollway ${doc.info.version}` : "Tollway";
  $("load-status").textContent =
    `${title}: ${apis} API${apis === 1 ? "" : "s"}, ${operations.length} operations.`;
  if (operations.length === 0) {
    $("operation-summary").textContent = "This gateway has no APIs configured.";
    return;
  }
  const wanted = decodeURIComponent(location.hash.slice(1));
  const chat = operations.find((op) => op.kind === "chat-completions");
  selectOperation(state.operations.has(wanted) ? wanted : (chat ?? operations[0]).id, false);
}

// --- the request form -----------------------------------------------------------------------

function sampleBody(op) {
  const sample = SAMPLES[op.kind];
  return sample ? JSON.stringify(sample, null, 2) : "";
}

function selectOperation(id, focus) {
  const op = state.operations.get(id);
  if (!op) return;
  if (state.current) state.bodies.set(state.current.id, $("body").value);
  state.current = op;
  for (const button of document.querySelectorAll(".operation")) {
    const current = button.dataset.operation === id;
    button.classList.toggle("current", current);
    if (current) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
  history.replaceState(null, "", `#${encodeURIComponent(id)}`);
  $("operation-summary").textContent =
    `${op.api}: ${op.summary}` + (op.keyRequired ? "" : " (this API needs no key)");
  $("operation-summary").className = "";
  const method = $("method");
  method.replaceChildren(...op.methods.map((m) => el("option", { value: m, text: m })));
  method.value = op.methods.includes("POST") && !op.wildcard ? "POST" : op.methods[0];
  method.disabled = op.methods.length < 2;
  $("subpath-row").hidden = !op.wildcard;
  if (op.wildcard && !$("subpath").value) $("subpath").value = "models";
  $("key-header").textContent = op.keyHeader;
  $("stream-row").hidden = !op.streams;
  $("body").value = state.bodies.get(id) ?? sampleBody(op);
  $("body-reset").hidden = !SAMPLES[op.kind];
  syncStreamBox();
  updateMethod();
  $("send").disabled = false;
  if (focus) $("request").focus();
}

// The default rows (a JSON Content-Type where a body goes), unless the user edited them.
function resetHeaderRows() {
  const body = $("headers").tBodies[0];
  if (body.dataset.touched === "true") return;
  body.replaceChildren();
  if (bodyAllowed()) addHeaderRow("Content-Type", "application/json");
}

function addHeaderRow(name = "", value = "") {
  const body = $("headers").tBodies[0];
  const n = body.rows.length + 1;
  const nameInput = el("input", { type: "text", value: name, autocomplete: "off",
                                  spellcheck: false, "aria-label": `Header ${n} name` });
  const valueInput = el("input", { type: "text", value, autocomplete: "off", spellcheck: false,
                                   "aria-label": `Header ${n} value` });
  const remove = el("button", { type: "button", class: "icon quiet", text: "✕",
                                title: "Remove this header", "aria-label": `Remove header ${n}` });
  const row = el("tr", {}, el("td", {}, nameInput), el("td", {}, valueInput), el("td", {}, remove));
  remove.addEventListener("click", () => {
    const next = row.nextElementSibling ?? row.previousElementSibling;
    row.remove();
    body.dataset.touched = "true";
    relabelHeaderRows();
    updatePreview();
    (next?.querySelector("input") ?? $("header-add")).focus();
  });
  body.append(row);
  return nameInput;
}

function relabelHeaderRows() {
  [...$("headers").tBodies[0].rows].forEach((row, i) => {
    const [name, value] = row.querySelectorAll("input");
    name.setAttribute("aria-label", `Header ${i + 1} name`);
    value.setAttribute("aria-label", `Header ${i + 1} value`);
    row.querySelector("button").setAttribute("aria-label", `Remove header ${i + 1}`);
  });
}

function headerRows() {
  return [...$("headers").tBodies[0].rows]
    .map((row) => [...row.querySelectorAll("input")].map((input) => input.value.trim()))
    .filter(([name]) => name !== "");
}

function currentMethod() {
  return $("method").value || state.current?.methods[0] || "GET";
}

function bodyAllowed() {
  const method = currentMethod();
  return state.current !== null && method !== "GET" && method !== "HEAD" &&
    (state.current.body || state.current.wildcard);
}

function updateMethod() {
  resetHeaderRows();
  const allowed = bodyAllowed();
  $("body").disabled = !allowed;
  $("body-box").classList.toggle("disabled", !allowed);
  updatePreview();
}

function requestUrl() {
  const op = state.current;
  let path = op.path;
  if (op.wildcard) {
    const sub = $("subpath").value.trim().replace(/^\/+/, "");
    path = path.replace("{path}", sub);
  }
  return new URL("." + path, document.baseURI);
}

function parseBody() {
  const text = $("body").value;
  if (text.trim() === "") return { ok: true, value: undefined };
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch (error) {
    return { ok: false, error: error.message };
  }
}

function syncStreamBox() {
  const parsed = parseBody();
  if (parsed.ok && parsed.value && typeof parsed.value === "object") {
    $("stream").checked = parsed.value.stream === true;
  }
  $("body-error").textContent = parsed.ok || !bodyAllowed() ? "" : `Not valid JSON: ${parsed.error}`;
}

function onStreamToggle() {
  const parsed = parseBody();
  const box = $("stream");
  if (!parsed.ok || !parsed.value || typeof parsed.value !== "object") {
    box.checked = !box.checked;
    $("body-error").textContent = "Fix the JSON body first: the stream switch edits it.";
    return;
  }
  const body = parsed.value;
  if (box.checked) {
    body.stream = true;
    // The Responses API always reports usage in its last event and has no include_usage.
    if (state.current.kind !== "responses") body.stream_options = { include_usage: true };
  } else {
    delete body.stream;
    delete body.stream_options;
  }
  $("body").value = JSON.stringify(body, null, 2);
  $("body-error").textContent = "";
  updatePreview();
}

function updatePreview() {
  const op = state.current;
  if (!op) return;
  let url;
  try {
    url = requestUrl();
  } catch {
    $("url").textContent = "—";
    return;
  }
  $("url").textContent = url.href;
  const key = $("key").value.trim();
  const shown = $("key").type === "text" ? key : MASK;
  const lines = [`${currentMethod()} ${url.pathname}${url.search} HTTP/1.1`, `Host: ${url.host}`];
  if (key) lines.push(`${op.keyHeader}: ${shown}`);
  for (const [name, value] of headerRows()) lines.push(`${name}: ${value}`);
  if (bodyAllowed() && $("body").value) lines.push("", $("body").value);
  $("preview").textContent = lines.join("\n");
}

// --- keys -----------------------------------------------------------------------------------

function setKeyVisible(visible) {
  $("key").type = visible ? "text" : "password";
  const toggle = $("key-toggle");
  toggle.setAttribute("aria-pressed", String(visible));
  const label = visible ? "Hide the key" : "Show the key";
  toggle.title = label;
  $("key-toggle-text").textContent = label;
  updatePreview();
}

function setKeySource(text) {
  $("key-source").textContent = text;
}

async function fillFromAdmin(adminKey, automatic) {
  const status = $("admin-status");
  status.className = "";
  status.textContent = "Asking the gateway for the all-access subscription's key…";
  let response;
  try {
    response = await fetch(new URL("admin/subscriptions/master/list-secrets", document.baseURI), {
      method: "POST",
      headers: { Authorization: `Bearer ${adminKey}` },
      credentials: "omit",
      cache: "no-store",
    });
  } catch {
    status.textContent = "Could not reach the gateway's admin API.";
    status.className = "error-text";
    return false;
  }
  const data = await response.json().catch(() => null);
  const key = data?.["primary-key"];
  if (response.ok && typeof key === "string" && key !== "") {
    storage()?.setItem(ADMIN_STORAGE, adminKey);
    $("key").value = key;
    setKeySource("The key of the built-in all-access subscription (every API).");
    status.textContent = automatic
      ? "Filled in the all-access key with the admin key given earlier in this tab."
      : "Filled in the key of the built-in all-access subscription.";
    updatePreview();
    return true;
  }
  status.className = "error-text";
  if (response.status === 401) {
    storage()?.removeItem(ADMIN_STORAGE);
    status.textContent = "The gateway refused the admin key.";
  } else if (response.status === 404) {
    status.textContent = "This gateway has no admin API (gateway.admin-key is not set) or no " +
      "all-access subscription (gateway.all-access: false).";
  } else if (response.status === 409) {
    status.textContent = "The all-access subscription's keys are not available.";
  } else {
    const message = data?.error?.message ?? response.statusText;
    status.textContent = `The admin API answered ${response.status}: ${message}`;
  }
  return false;
}

async function restoreAdminKey() {
  const stored = storage()?.getItem(ADMIN_STORAGE);
  if (!stored) return;
  $("admin-key").value = stored;
  if ($("key").value === "") await fillFromAdmin(stored, true);
}

// --- sending --------------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  const op = state.current;
  if (!op || state.controller) return;
  const headers = new Headers();
  for (const [name, value] of headerRows()) {
    try {
      headers.append(name, value);
    } catch {
      $("body-error").textContent = `The header ${JSON.stringify(name)} is not valid.`;
      return;
    }
  }
  const key = $("key").value.trim();
  if (key) headers.set(op.keyHeader, key);
  let body;
  if (bodyAllowed()) {
    body = $("body").value;
    const parsed = parseBody();
    if (op.body && !op.wildcard && !parsed.ok) {
      $("body-error").textContent = `Not valid JSON: ${parsed.error}`;
      $("body").focus();
      return;
    }
  }
  if (op.wildcard && $("subpath").value.trim() === "") {
    $("body-error").textContent = "Give the subpath to call.";
    $("subpath").focus();
    return;
  }
  const url = requestUrl();
  const method = currentMethod();
  const controller = new AbortController();
  state.controller = controller;
  const view = new ResponseView(op);
  busy(true);
  setStatus(`Sending ${method} ${url.pathname}…`, "pending");
  try {
    const response = await fetch(url, {
      method, headers, body, signal: controller.signal, credentials: "omit", cache: "no-store",
    });
    view.head(response);
    const type = response.headers.get("content-type") ?? "";
    if (type.startsWith("text/event-stream") && response.body) await view.stream(response.body);
    else view.whole(await response.text());
    view.done();
  } catch (error) {
    if (error.name === "AbortError") view.stopped();
    else view.failed(error);
  } finally {
    state.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("response").setAttribute("aria-busy", String(on));
}

// --- the response ---------------------------------------------------------------------------

// An incremental parser of server-sent events (the WHATWG event-stream format): feed() any
// piece of text, it calls onEvent({event, data}) for every complete event.
class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.data = [];
    this.event = "";
    this.started = false;
  }

  feed(text) {
    this.buffer += text;
    if (!this.started && this.buffer.length > 0) {
      this.started = true;
      if (this.buffer.charCodeAt(0) === 0xfeff) this.buffer = this.buffer.slice(1);
    }
    let start = 0;
    for (;;) {
      const lf = this.buffer.indexOf("\n", start);
      const cr = this.buffer.indexOf("\r", start);
      if (lf < 0 && cr < 0) break;
      let end, next;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        if (cr === this.buffer.length - 1) break; // a CR LF may be split between pieces
        end = cr;
        next = this.buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
      } else {
        end = lf;
        next = lf + 1;
      }
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  // The end of the stream: a last event without its blank line is incomplete (discarded, as
  // browsers do); what was left is returned for display.
  end() {
    const rest = this.buffer;
    if (rest.endsWith("\r")) this.line(rest.slice(0, -1));
    const left = rest.endsWith("\r") ? "" : rest;
    const pending = this.data.length > 0 ? this.data.join("\n") : "";
    this.buffer = "";
    this.data = [];
    return [pending, left].filter(Boolean).join("\n");
  }

  line(line) {
    if (line === "") {
      if (this.data.length > 0) this.onEvent({ event: this.event, data: this.data.join("\n") });
      this.data = [];
      this.event = "";
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
  }
}

// The text a streamed chunk or event adds (chat, completions, Responses API).
function deltaText(chunk) {
  if (typeof chunk.type === "string") {
    return chunk.type === "response.output_text.delta" ? chunk.delta ?? "" : "";
  }
  const choice = chunk.choices?.[0];
  return choice?.delta?.content ?? choice?.text ?? "";
}

// The usage object of a reply, a streamed chunk or a Responses API event, if it has one.
function usageOf(reply) {
  const usage = reply?.usage ?? reply?.response?.usage;
  return usage && typeof usage === "object" ? usage : null;
}

// The readable text of a whole JSON reply.
function replyText(reply) {
  const choice = reply?.choices?.[0];
  if (typeof choice?.message?.content === "string") return choice.message.content;
  if (typeof choice?.text === "string") return choice.text;
  if (Array.isArray(reply?.output)) {
    const parts = reply.output.flatMap((item) => item?.content ?? []);
    const texts = parts.filter((p) => p?.type === "output_text").map((p) => p.text);
    if (texts.length) return texts.join("");
  }
  if (reply?.object === "list" && Array.isArray(reply.data)) {
    const embeddings = reply.data.filter((d) => Array.isArray(d?.embedding));
    if (embeddings.length) {
      return `${embeddings.length} embedding(s) of ${embeddings[0].embedding.length} numbers.`;
    }
    const ids = reply.data.map((d) => d?.id).filter((id) => typeof id === "string");
    if (ids.length) return ids.join("\n");
  }
  return null;
}

function flatten(object, prefix = "") {
  const out = [];
  for (const [name, value] of Object.entries(object)) {
    if (value && typeof value === "object") out.push(...flatten(value, `${prefix}${name}.`));
    else if (value !== null && value !== undefined) out.push([prefix + name, String(value)]);
  }
  return out;
}

class ResponseView {
  constructor(op) {
    this.op = op;
    this.started = performance.now();
    this.firstByte = null;
    this.events = 0;
    this.response = null;
    this.usage = null;
    this.streamed = false;
    this.text = document.createTextNode("");
    $("output").replaceChildren(this.text);
    $("output").classList.remove("json");
    $("raw").replaceChildren();
    $("response-headers").tBodies[0].replaceChildren();
    $("event-count").textContent = "no events";
    $("progress").textContent = "";
    $("error").hidden = true;
    $("error").replaceChildren();
    $("usage-list").replaceChildren();
    $("usage-list").hidden = true;
    $("usage-empty").hidden = false;
    $("usage-empty").textContent = "Waiting for the reply…";
  }

  seconds(since = this.started) {
    return `${((performance.now() - since) / 1000).toFixed(2)} s`;
  }

  head(response) {
    this.response = response;
    this.firstByte = performance.now();
    const reason = response.statusText || REASONS[response.status] || "";
    this.statusLine = `${response.status} ${reason}`.trim();
    setStatus(`${this.statusLine} · headers after ${this.seconds()}`,
      response.ok ? "ok" : "bad");
    const rows = $("response-headers").tBodies[0];
    const limits = new Set(this.limitNames());
    for (const [name, value] of response.headers) {
      const row = el("tr", {}, el("th", { scope: "row", text: name }), el("td", { text: value }));
      if (limits.has(name) || STAMP.includes(name)) row.className = "limit";
      rows.append(row);
    }
    this.renderUsage();
  }

  // The limit headers /openapi.json documents for the operation, then any other header of
  // the reply that looks like one (a retry header, a backend's own rate-limit headers).
  limitNames() {
    const names = this.op.limitHeaders.map((n) => n.toLowerCase());
    const retry = this.op.retryHeaders.map((n) => n.toLowerCase());
    for (const [name] of this.response?.headers ?? []) {
      if ((LIMIT_LIKE.test(name) || retry.includes(name)) && !names.includes(name)) {
        names.push(name);
      }
    }
    return names;
  }

  async stream(body) {
    this.streamed = true;
    setStatus(`${this.statusLine} · streaming…`, "ok");
    this.renderUsage();
    const raw = $("raw");
    const parser = new EventStreamParser((event) => this.onEvent(event, raw));
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(value);
    }
    const rest = parser.end();
    if (rest) raw.append(el("span", { class: "incomplete", text: `(incomplete) ${rest}\n` }));
  }

  onEvent(event, raw) {
    this.events += 1;
    const head = event.event ? `event: ${event.event}\n` : "";
    raw.append(`${head}data: ${event.data}\n\n`);
    $("event-count").textContent = `${this.events} event${this.events === 1 ? "" : "s"}`;
    if (event.data === "[DONE]") return;
    let chunk;
    try {
      chunk = JSON.parse(event.data);
    } catch {
      return; // not JSON: shown raw only
    }
    if (chunk?.error) this.showError(chunk.error, "The stream ended with an error");
    const delta = deltaText(chunk ?? {});
    if (delta) this.text.appendData(delta);
    const usage = usageOf(chunk);
    if (usage) {
      this.usage = usage;
      this.renderUsage();
    }
    // Not in the live status region: a screen reader would read every token's update.
    $("progress").textContent =
      `Streaming: ${this.events} events, ${this.text.length} characters, ${this.seconds()}`;
  }

  whole(text) {
    let reply = null;
    try {
      reply = text ? JSON.parse(text) : null;
    } catch {
      reply = null;
    }
    const pretty = reply === null ? text : JSON.stringify(reply, null, 2);
    $("raw").textContent = pretty;
    $("event-count").textContent = `${text.length} bytes`;
    const readable = this.response.ok ? replyText(reply) : null;
    this.text.appendData(readable ?? pretty);
    $("output").classList.toggle("json", readable === null);
    this.usage = usageOf(reply);
    if (!this.response.ok) this.showError(reply?.error, null);
    this.renderUsage();
  }

  renderUsage() {
    const groups = [];
    if (this.usage) {
      const caption = this.streamed ? "Usage (reported in the stream)" : "Usage (the reply)";
      groups.push([caption, flatten(this.usage).map(([n, v]) => [n, v, "reported"])]);
    }
    const headers = this.response?.headers;
    const limits = [];
    for (const name of [...this.limitNames(), ...STAMP]) {
      const value = headers?.get(name);
      const kind = STAMP.includes(name) ? "sent stamp" : "sent";
      if (value !== null && value !== undefined) limits.push([name, value, kind]);
      else if (!STAMP.includes(name)) limits.push([name, "not in this response", "absent"]);
    }
    if (limits.length) groups.push(["The gateway's headers", limits]);
    const list = $("usage-list");
    list.replaceChildren(
      ...groups.map(([caption, rows]) =>
        el("div", { class: "usage-group" },
           el("h4", { text: caption }),
           ...rows.map(([name, value, kind]) =>
             el("div", { class: `usage-row ${kind}` },
                el("dt", {}, el("code", { text: name })),
                el("dd", { text: value }))))),
    );
    list.hidden = groups.length === 0;
    const empty = $("usage-empty");
    empty.hidden = groups.length > 0 && !this.streamed;
    empty.textContent = this.streamed
      ? "A stream's headers leave before its first token: their figures count the request's " +
        "reservation (prompt estimate and max tokens). The usage is what the backend reported."
      : this.response ? "No usage reported." : "";
  }

  showError(error, prefix) {
    const box = $("error");
    const status = this.response.status;
    const parts = [];
    const code = error?.code ?? error?.type;
    const title = prefix ?? `${this.statusLine}${code ? ` · ${code}` : ""}`;
    parts.push(el("strong", { text: title }));
    if (error?.message) parts.push(el("p", { text: error.message }));
    const wait = this.retryAfter();
    if (wait) parts.push(el("p", { text: `Retry after ${wait.seconds} s (${wait.header}).` }));
    if (status === 401) {
      parts.push(el("p", { class: "small", text: "Check the subscription key: paste a valid " +
        "key, or fill in the all-access key with the admin key." }));
    }
    box.replaceChildren(...parts);
    box.hidden = false;
  }

  retryAfter() {
    const headers = this.response?.headers;
    for (const name of this.op.retryHeaders) {
      const value = headers?.get(name);
      if (value) return { seconds: value, header: name };
    }
    return null;
  }

  done() {
    $("progress").textContent = "";
    const extra = this.events ? ` · ${this.events} events` : "";
    setStatus(`${this.statusLine} · ${this.seconds()}${extra}`, this.response.ok ? "ok" : "bad");
  }

  stopped() {
    $("progress").textContent = "";
    setStatus(`${this.statusLine ?? "No reply"} · stopped after ${this.seconds()}`, "bad");
  }

  failed(error) {
    $("progress").textContent = "";
    setStatus(`The request failed after ${this.seconds()}: ${error.message}`, "bad");
    const box = $("error");
    box.replaceChildren(el("strong", { text: "No reply from the gateway" }),
      el("p", { text: error.message }));
    box.hidden = false;
  }
}

// --- wiring ---------------------------------------------------------------------------------

function wire() {
  $("request-form").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("method").addEventListener("change", updateMethod);
  $("subpath").addEventListener("input", updatePreview);
  $("key").addEventListener("input", () => {
    setKeySource("A key you entered.");
    updatePreview();
  });
  $("key-toggle").addEventListener("click", () => setKeyVisible($("key").type === "password"));
  $("stream").addEventListener("change", onStreamToggle);
  $("body").addEventListener("input", () => {
    syncStreamBox();
    updatePreview();
  });
  $("body").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("request-form").requestSubmit();
    }
  });
  $("body-reset").addEventListener("click", () => {
    $("body").value = sampleBody(state.current);
    syncStreamBox();
    updatePreview();
  });
  $("headers").addEventListener("input", () => {
    $("headers").tBodies[0].dataset.touched = "true";
    updatePreview();
  });
  $("header-add").addEventListener("click", () => {
    $("headers").tBodies[0].dataset.touched = "true";
    addHeaderRow().focus();
  });
  $("admin-fill").addEventListener("click", () => {
    const adminKey = $("admin-key").value.trim();
    if (adminKey) fillFromAdmin(adminKey, false);
    else $("admin-key").focus();
  });
  $("admin-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      $("admin-fill").click();
    }
  });
  $("admin-forget").addEventListener("click", () => {
    storage()?.removeItem(ADMIN_STORAGE);
    $("admin-key").value = "";
    $("admin-status").className = "";
    $("admin-status").textContent = "The admin key is forgotten in this tab.";
  });
  window.addEventListener("hashchange", () => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (state.operations.has(id) && id !== state.current?.id) selectOperation(id, false);
  });
}

wire();
await loadDescription();
await restoreAdminKey();
document.body.dataset.ready = "true";
