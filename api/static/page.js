// The page at `/`: one card per run, on the thoughtwire client (/thoughtwire.js).
//
// Model text reaches the DOM two ways only: as textContent, or, for answers, as
// Markdown rendered by marked and then sanitised by DOMPurify before innerHTML. The
// frontend also serves this page with a Content-Security-Policy that runs no script
// but its own files, so a sanitiser bug would still run nothing.
import { Thoughtwire } from "/thoughtwire.js";
import { marked } from "/static/vendor/marked.esm.js";
import DOMPurify from "/static/vendor/purify.es.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "thoughtwire.token";
const PROMPTS_KEY = "thoughtwire.prompts";
const KEPT_PROMPTS = 100; // prompts remembered per tab, to label runs after a reload
const NEAR_BOTTOM = 48; // px: closer than this to the end counts as "at the bottom"

const KINDS = { thinking: "Thinking", action: "Action", observation: "Observation", retry: "Retry" };
const ENDS = { done: "Done", cancelled: "Stopped", error: "Failed" };

marked.use({ gfm: true, breaks: false });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});
// HTML only (no SVG or MathML), no styles (the policy would refuse them anyway) and
// nothing that takes input.
const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_ATTR: ["style"],
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
};

/** Markdown text as sanitised HTML, set into `el`. */
function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
}

/** The claims of a JWT, unverified: only to tell a viewer link from an owner's token. */
function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return {};
  }
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

// ---------------------------------------------------------------- who and where

/** Token and session from the fragment (then taken out of the address bar), else this tab. */
function startingPoint() {
  const params = new URLSearchParams(location.hash.slice(1));
  let token = params.get("token");
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else token = sessionStorage.getItem(TOKEN_KEY);
  const claims = token ? claimsOf(token) : {};
  const viewer = claims.scope === "view";
  const session = (viewer && claims.sid) || params.get("session") || null;
  showSession(session);
  return { token, session, viewer };
}

/** Keep the session, and never the token, in the address bar, so a reload continues it. */
function showSession(session) {
  const hash = session ? "#" + new URLSearchParams({ session }).toString() : "";
  history.replaceState(null, "", location.pathname + location.search + hash);
}

const start = startingPoint();
let token = start.token;
const viewer = start.viewer;

// ---------------------------------------------------------------- autoscroll

function nearBottom() {
  const root = document.documentElement;
  return window.innerHeight + window.scrollY >= root.scrollHeight - NEAR_BOTTOM;
}

function toBottom() {
  window.scrollTo(0, document.documentElement.scrollHeight);
  $("jump").hidden = true;
}

/**
 * Change the log, and follow the change only if the reader was at the bottom before it.
 * Asked before each change rather than kept from scroll events, which arrive late: a
 * reader who has just scrolled up is never pulled back down by the next token.
 */
function change(mutate) {
  const follow = nearBottom();
  mutate();
  if (follow) toBottom();
  else $("jump").hidden = false;
}

addEventListener(
  "scroll",
  () => {
    if (nearBottom()) $("jump").hidden = true;
  },
  { passive: true },
);

$("jump").addEventListener("click", toBottom);

// ---------------------------------------------------------------- runs

const cards = new Map(); // run id -> Card
const pending = []; // prompts sent from this page whose run has not shown up yet
let prompts = {}; // run id -> its prompt, as far as this tab knows

/** One run: its prompt, a timeline of steps, the answer and how it ended. */
class Card {
  constructor(run, prompt) {
    this.run = run;
    this.answer = "";
    this.lastStep = null;
    this.firstTs = null;
    this.touched = false; // the reader opened or closed the timeline themselves
    this.el = element("article", "run");
    this.el.dataset.run = run;
    this.el.dataset.status = "running";
    this.el.setAttribute("aria-label", "Run");

    const head = element("header", "run-head");
    const who = element("p", "prompt");
    who.append(element("span", "label", "Prompt"));
    this.prompt = element("span", "prompt-text");
    this.setPrompt(prompt);
    who.append(this.prompt);
    this.badge = element("span", "badge", "Running");
    head.append(who, this.badge);
    if (!viewer) {
      this.stop = element("button", "stop danger", "Stop");
      this.stop.type = "button";
      this.stop.setAttribute("aria-label", "Stop this run");
      this.stop.addEventListener("click", () => this.cancel());
      head.append(this.stop);
    }

    this.timeline = element("details", "timeline");
    this.timeline.open = true;
    this.summary = element("summary", "", "Steps");
    this.steps = element("ol", "steps");
    this.timeline.append(this.summary, this.steps);
    // A click (or Enter/Space) on the summary is the reader's choice: keep it.
    this.summary.addEventListener("click", () => {
      this.touched = true;
    });

    this.body = element("div", "answer markdown");
    this.footer = element("p", "run-foot", "");
    this.el.append(head, this.timeline, this.body, this.footer);
    this.count = 0;
  }

  setPrompt(text) {
    this.prompt.textContent = text ?? (viewer ? "(prompts are not shared with viewers)" : "(sent from another tab or client)");
    this.prompt.classList.toggle("unknown", text == null);
  }

  /** Apply one event of this run, in seq order. */
  apply(event) {
    if (this.firstTs === null && event.ts) this.firstTs = event.ts;
    const kind = event.type;
    if (kind === "answer") {
      this.answer += event.content ?? "";
      this.scheduleRender();
    } else if (kind === "retry") {
      this.answer = ""; // a new attempt starts the answer over
      this.render();
      this.step("retry", `Attempt ${event.attempt}: the run starts over`);
    } else if (kind in KINDS) {
      this.step(kind, String(event.content ?? ""));
    } else if (kind in ENDS) {
      this.end(event);
    }
  }

  step(kind, text) {
    // Reasoning streams as many small deltas: consecutive ones make one paragraph.
    if (kind === "thinking" && this.lastStep?.kind === "thinking") {
      const prev = this.lastStep.text.textContent;
      // Whole sentences from an agent that thinks in steps each start a new line.
      const joint = /[.!?…:]$/.test(prev) && /^[A-Z]/.test(text) ? "\n" : "";
      this.lastStep.text.textContent = prev + joint + text;
      return;
    }
    const li = element("li", `step step-${kind}`);
    li.append(element("span", "kind", KINDS[kind]));
    const body = element("span", "text", text);
    li.append(body);
    this.steps.append(li);
    this.lastStep = { kind, text: body };
    this.count += 1;
    this.summary.textContent = `Steps (${this.count})`;
  }

  scheduleRender() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      change(() => this.render());
    });
  }

  render() {
    renderMarkdown(this.body, this.answer);
  }

  end(event) {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = null;
    this.render();
    this.el.dataset.status = event.type;
    this.badge.textContent = ENDS[event.type];
    if (this.stop) this.stop.remove();
    const took = this.firstTs && event.ts ? ` in ${((event.ts - this.firstTs) / 1000).toFixed(1)} s` : "";
    if (event.type === "done") {
      this.footer.textContent = `Done${took}.`;
    } else if (event.type === "cancelled") {
      this.footer.textContent = `Stopped${took}: ${event.content || "the run was cancelled"}.`;
    } else {
      this.footer.textContent = `Failed${took}: ${event.content || event.message || "the run failed"}`;
    }
    if (!this.touched && this.count > 0) this.timeline.open = false; // the answer matters now
  }

  cancel() {
    try {
      tw.cancel(this.run);
    } catch (err) {
      notice(`Could not stop the run: ${err.message || err}`);
      return;
    }
    this.stop.disabled = true;
    this.stop.textContent = "Stopping…";
    this.badge.textContent = "Stopping";
  }
}

function cardFor(run) {
  let card = cards.get(run);
  if (!card) {
    if (!(run in prompts) && pending.length) remember(run, pending.shift());
    card = new Card(run, prompts[run]);
    cards.set(run, card);
    $("runs").append(card.el);
    $("empty").hidden = true;
  }
  return card;
}

function remember(run, text) {
  prompts[run] = text;
  const runs = Object.keys(prompts);
  for (const old of runs.slice(0, Math.max(0, runs.length - KEPT_PROMPTS))) delete prompts[old];
  if (tw?.session) sessionStorage.setItem(`${PROMPTS_KEY}.${tw.session}`, JSON.stringify(prompts));
}

/** A line in the log that belongs to no run: a gap, a refused prompt. */
function notice(text, kind = "notice") {
  change(() => {
    $("runs").append(element("p", kind, text));
    $("empty").hidden = true;
  });
}

// ---------------------------------------------------------------- connection

const STATES = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  resumed: "Resumed",
  closed: "Offline",
};

function showState(detail, first) {
  let state = detail.state;
  let text = STATES[state] ?? state;
  if (state === "resumed" && !detail.gap && first) {
    state = "connected"; // a session opened from its start: nothing was missed
    text = STATES.connected;
  } else if (state === "resumed" && detail.gap) {
    state = "gap";
    text = "Resumed, with a gap: some events were lost";
  } else if (state === "closed") {
    state = "offline";
    if (detail.reason) text = `Offline: ${detail.reason}`;
  }
  document.body.dataset.state = state;
  $("connection-text").textContent = text;
  $("retry").hidden = state !== "offline" || detail.code === 4001;
  $("share").disabled = !(tw?.session);
}

let tw = null;

function open(session) {
  const options = {};
  if (token) options.token = () => token; // called on every connect: a new sign-in takes effect
  if (session) {
    options.session = session;
    options.after = 0; // the whole log: a reload or a viewer link shows the runs so far
  }
  const client = new Thoughtwire(options);
  let first = true; // this client has not been connected yet
  client.addEventListener("state", (e) => {
    if (client !== tw) return;
    showState(e.detail, first);
    if (e.detail.state === "connected" || e.detail.state === "resumed") first = false;
    if (e.detail.state !== "closed") return;
    if (viewer && (e.detail.code === 4001 || e.detail.code === 4003)) {
      $("readonly-text").textContent = "This link no longer grants access (it may have expired): ask for a new one.";
    } else if (e.detail.code === 4001) {
      askForToken(e.detail.reason);
    }
  });
  client.addEventListener("event", (e) => {
    if (client !== tw || !e.detail.run) return;
    change(() => cardFor(e.detail.run).apply(e.detail));
  });
  client.addEventListener("error", (e) => {
    // Something asked of the client failed (a prompt or a cancel refused); it goes on.
    if (client !== tw) return;
    const { action, reason } = e.detail;
    notice(`Could not ${action === "cancel" ? "stop the run" : `send the ${action}`}: ${reason}`, "notice error");
  });
  client.addEventListener("gap", (e) => {
    if (client !== tw) return;
    notice(`Some events could not be recovered (${e.detail.reason}); the stream goes on from here.`);
  });
  client.addEventListener("message", (e) => {
    if (client !== tw) return;
    const message = e.detail;
    if (message.type === "session") joined(message.session);
    else if (message.type === "error") notice(message.message || "The frontend refused that.", "notice error");
  });
  tw = client;
  client.connect().catch(() => {}); // failures arrive as "closed" state events
}

function joined(session) {
  document.body.dataset.session = session;
  showSession(session);
  $("share").disabled = false;
  if (viewer) $("readonly-text").textContent = `Following session ${session} live. This view cannot prompt or stop runs.`;
  try {
    prompts = JSON.parse(sessionStorage.getItem(`${PROMPTS_KEY}.${session}`) || "{}");
  } catch {
    prompts = {};
  }
  for (const [run, card] of cards) if (run in prompts) card.setPrompt(prompts[run]);
}

function reset() {
  tw?.close();
  tw = null;
  cards.clear();
  pending.length = 0;
  $("runs").replaceChildren();
  $("empty").hidden = viewer;
}

// ---------------------------------------------------------------- sign-in

function askForToken(reason) {
  $("signin").hidden = false;
  $("signin-why").textContent =
    reason && reason !== "missing token"
      ? `The frontend refused the token (${reason}). Sign in with another one.`
      : "This gateway needs an access token.";
  $("empty").hidden = true;
  $("composer").hidden = true;
  $("token").focus();
}

$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("signin").hidden = true;
  $("composer").hidden = viewer;
  reset();
  open(document.body.dataset.session || start.session);
});

$("retry").addEventListener("click", () => {
  const session = tw?.session || start.session;
  reset();
  open(session);
});

$("new-session").addEventListener("click", () => {
  reset();
  delete document.body.dataset.session;
  showSession(null);
  open(null);
});

// ---------------------------------------------------------------- prompting

function send() {
  const text = $("prompt").value.trim();
  if (!text) return;
  try {
    tw.prompt(text);
  } catch (err) {
    notice(`Not sent: ${err.message || "not connected"}. It is still in the box.`, "notice error");
    return;
  }
  pending.push(text);
  $("prompt").value = "";
  fit();
  toBottom(); // whoever sends a prompt wants to see its run
}

function fit() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight, 200)}px`;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (e) => {
  // Enter sends; Shift+Enter starts a new line, as in every chat box.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("prompt").addEventListener("input", fit);

// ---------------------------------------------------------------- sharing

$("share").addEventListener("click", async () => {
  const session = tw?.session;
  if (!session) return;
  const dialog = $("share-dialog");
  $("share-ready").hidden = true;
  $("share-message").hidden = false;
  $("share-message").textContent = "Making a link…";
  dialog.showModal();
  const link = new URL("/", location.href);
  if (viewer) {
    link.hash = new URLSearchParams({ session, token }).toString();
    return shared(link, "This is the link you opened; it lasts as long as its token.");
  }
  if (!token) {
    link.hash = new URLSearchParams({ session }).toString();
    $("share-message").textContent =
      "Authentication is off on this gateway, so there are no read-only links: anyone who can reach it can open " +
      link.href +
      " and prompt this session too.";
    return;
  }
  try {
    const response = await fetch(`/v1/sessions/${encodeURIComponent(session)}/viewer-token`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
    link.hash = new URLSearchParams({ session, token: body.token }).toString();
    const until = new Date(body.expires * 1000).toLocaleString();
    shared(link, `The link works until ${until}.`);
  } catch (err) {
    $("share-message").textContent = `Could not make a link: ${err.message}`;
  }
});

function shared(link, expiry) {
  $("share-message").hidden = true;
  $("share-ready").hidden = false;
  $("share-link").value = link.href;
  $("share-expiry").textContent = expiry;
  $("share-link").select();
}

$("copy").addEventListener("click", async () => {
  $("share-link").select();
  try {
    await navigator.clipboard.writeText($("share-link").value);
    $("copy").textContent = "Copied";
  } catch {
    $("copy").textContent = "Press Ctrl+C";
  }
});

// ---------------------------------------------------------------- start

if (viewer) {
  document.body.classList.add("readonly");
  $("readonly").hidden = false;
  $("composer").hidden = true;
  $("new-session").hidden = true;
  $("empty").hidden = true;
}
open(start.session);
