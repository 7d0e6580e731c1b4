// The page at `/`: one card per run, on the thoughtwire client (/thoughtwire.js).
//
// Model text reaches the DOM two ways only: as textContent, or, for answers, as
// Markdown rendered by marked and then sanitised by DOMPurify before innerHTML. The
// frontend also serves this page with a Content-Security-Policy that runs no script
// but its own files, so a sanitiser bug would still run nothing.
import { Thoughtwire, initialState } from "/thoughtwire.js";
import { marked } from "/static/vendor/marked.esm.js";
import DOMPurify from "/static/vendor/purify.es.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "thoughtwire.token";
const PROMPTS_KEY = "thoughtwire.prompts";
const KEPT_PROMPTS = 100; // prompts remembered per tab, to label runs after a reload
const NEAR_BOTTOM = 48; // px: closer than this to the end counts as "at the bottom"

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
  // An answer-only link: the frontend sends no reasoning, tool arguments or results.
  return { token, session, viewer, answerOnly: viewer && claims.view === "answer" };
}

/** Keep the session, and never the token, in the address bar, so a reload continues it. */
function showSession(session) {
  const hash = session ? "#" + new URLSearchParams({ session }).toString() : "";
  history.replaceState(null, "", location.pathname + location.search + hash);
}

// A link opened in a tab that already shows the page changes only the fragment: the
// document stays, and startingPoint() has run. Take the link as a fresh open of it in
// this tab would (its token kept in place of the tab's, and out of the address bar at
// once), then start over from it. The page itself never sets location.hash, and
// showSession's history.replaceState fires no hashchange, so this cannot loop.
addEventListener("hashchange", () => {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("token") && !params.has("session")) return; // not a link
  if (!params.has("token") && params.get("session") === document.body.dataset.session) return; // shown already
  startingPoint();
  location.reload();
});

const start = startingPoint();
let token = start.token;
const viewer = start.viewer;
const answerOnly = start.answerOnly;

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

// A card is drawn from the run's state, as the client folds the session's frames into
// it with its reducer (`folded`; docs/protocol.md, "The reducer"); the page never interprets events
// itself. Each block keeps its own elements and changes only what changed, so a token
// costs a text append, not a redraw of the run.

const cards = new Map(); // run id -> Card
const pending = new Map(); // key -> a prompt sent from this page whose run is not named yet
let prompts = {}; // run id -> its prompt, as far as this tab knows
let state = initialState(); // the client's folded state, as last drawn

/** Pretty JSON for a tool call's arguments: an object, or JSON text, or the text as it is. */
function prettyArguments(args) {
  if (typeof args !== "string") return JSON.stringify(args, null, 2);
  try {
    return JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    return args;
  }
}

const TEMPLATE = document.createElement("template");

/** Sanitised HTML of some Markdown, as nodes to insert (a template's content is inert). */
function markdownNodes(text) {
  TEMPLATE.innerHTML = DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
  return TEMPLATE.content;
}

/** Where the settled part of a streaming Markdown text may end: after its last blank line outside a code fence. */
function settledEnd(text, from) {
  let fenced = false;
  let end = from;
  let at = from;
  for (let next = text.indexOf("\n", at); next !== -1; next = text.indexOf("\n", at)) {
    const line = text.slice(at, next);
    if (/^ {0,3}(```|~~~)/.test(line)) fenced = !fenced;
    else if (!fenced && line.trim() === "" && at > from) end = next + 1;
    at = next + 1;
  }
  return end;
}

/**
 * An answer's Markdown, drawn as it streams. Paragraphs that a blank line has closed are
 * rendered once and kept; only the open tail is rendered again, at most once a frame.
 * When the block is complete the whole text is rendered once more, so Markdown that
 * spans paragraphs (a loose list, a reference link) comes out exactly.
 */
class MarkdownView {
  constructor(el) {
    this.el = el;
    this.text = "";
    this.done = false;
    this.settled = 0; // characters of `text` rendered for good
    this.tail = []; // the nodes of the rendering of text[settled:]
  }

  show(text, done) {
    if (text === this.text && done === this.done) return;
    if (done) {
      this.el.replaceChildren(markdownNodes(text));
      this.tail = [];
      this.settled = text.length;
    } else {
      if (this.done || !text.startsWith(this.text.slice(0, this.settled))) this.clear();
      for (const node of this.tail) node.remove();
      const end = settledEnd(text, this.settled);
      if (end > this.settled) {
        this.el.append(markdownNodes(text.slice(this.settled, end)));
        this.settled = end;
      }
      const tail = markdownNodes(text.slice(this.settled));
      this.tail = [...tail.childNodes];
      this.el.append(tail);
    }
    this.text = text;
    this.done = done;
  }

  clear() {
    this.el.replaceChildren();
    this.settled = 0;
    this.tail = [];
  }
}

/** Consecutive reasoning blocks of a run: one "Reasoning" disclosure of joined text. */
class ReasoningView {
  constructor(card) {
    this.card = card;
    this.el = element("details", "reasoning");
    this.el.open = card.status === "running" || card.status === "waiting";
    const summary = element("summary", "", "Reasoning");
    this.text = element("div", "reasoning-text");
    this.el.append(summary, this.text);
    // A click (or Enter/Space) on the summary is the reader's choice: keep it.
    summary.addEventListener("click", () => {
      card.touched = true;
    });
  }

  /** A text node for one more block, on its own line after the first. */
  add() {
    if (this.text.firstChild) this.text.append("\n");
    const node = document.createTextNode("");
    this.text.append(node);
    return node;
  }
}

/** One reasoning block: a text node inside its group, appended to as deltas come. */
class ThoughtView {
  constructor(group) {
    this.group = group;
    this.node = group.add();
  }

  update(block) {
    const shown = this.node.data;
    if (block.text === shown) return;
    if (block.text.startsWith(shown)) this.node.appendData(block.text.slice(shown.length));
    else this.node.data = block.text;
  }
}

/** An answer block: sanitised Markdown. */
class TextView {
  constructor() {
    this.el = element("div", "answer markdown");
    this.markdown = new MarkdownView(this.el);
  }

  update(block) {
    this.markdown.show(block.text, block.done);
  }
}

const TOOL_STATUS = {
  preparing: "Preparing…",
  waiting: "Waiting for approval",
  running: "Running…",
  done: "Done",
  error: "Error",
  denied: "Denied",
  unfinished: "No result",
  undecided: "Not decided",
};

/** A tool call and its result in one card: name, arguments, approval, status, output. */
class ToolView {
  constructor(card, tool) {
    this.card = card;
    this.call = null; // the tool_call block, once seen
    this.result = null; // the tool_result block, once seen
    this.el = element("section", "tool");
    const head = element("header", "tool-head");
    head.append(element("span", "label", "Tool"));
    this.name = element("code", "tool-name", tool || "tool");
    this.status = element("span", "tool-status");
    head.append(this.name, this.status);
    this.el.setAttribute("aria-label", `Tool call: ${tool || "tool"}`);
    this.argsLabel = element("p", "label", "Arguments");
    this.args = element("pre", "tool-args");
    this.approval = element("div", "approval");
    this.approval.hidden = true;
    this.outputLabel = element("p", "label", "Result");
    this.output = element("pre", "tool-output");
    this.outputLabel.hidden = this.output.hidden = true;
    this.el.append(head, this.argsLabel, this.args, this.approval, this.outputLabel, this.output);
    this.shownApproval = undefined;
  }

  update(block) {
    if (block.kind === "tool_result") this.result = block;
    else this.call = block;
    this.draw();
  }

  draw() {
    const call = this.call;
    const tool = call?.tool || this.result?.tool;
    if (tool && this.name.textContent !== tool) {
      this.name.textContent = tool;
      this.el.setAttribute("aria-label", `Tool call: ${tool}`);
    }
    if (call) {
      // A log without blocks (protocol v1) has no arguments: its action's text says what it did.
      const text = call.arguments != null ? prettyArguments(call.arguments) : call.input || (call.tool ? "" : call.text);
      if (this.args.textContent !== text) this.args.textContent = text;
      this.drawApproval(call.approval);
    }
    this.argsLabel.hidden = this.args.hidden = !this.args.textContent;
    if (this.result) {
      // An answer-only link gets results without their text: nothing to show but the status.
      this.outputLabel.hidden = this.output.hidden = answerOnly && !this.result.text;
      this.outputLabel.textContent = this.result.is_error ? "Error" : "Result";
      if (this.output.textContent !== this.result.text) this.output.textContent = this.result.text;
    }
    const status = this.statusOf();
    this.el.dataset.status = status;
    this.status.textContent = TOOL_STATUS[status];
  }

  statusOf() {
    const approval = this.call?.approval;
    if (this.result) return approval?.status === "deny" ? "denied" : this.result.is_error ? "error" : "done";
    if (approval?.status === "deny") return "denied";
    // An ended run waits for nothing: a call still pending when it ended was never decided.
    if (this.card.ended) return approval?.status === "pending" ? "undecided" : "unfinished";
    if (approval?.status === "pending") return "waiting";
    return this.call && !this.call.done ? "preparing" : "running";
  }

  /** Offer the buttons again: the frontend refused the decision sent. */
  reopen() {
    if (this.call?.approval?.status !== "pending") return;
    this.shownApproval = undefined;
    this.drawApproval(this.call.approval);
  }

  drawApproval(approval) {
    const key = approval && `${approval.status}|${approval.by}|${approval.reason}|${this.card.ended}`;
    if (key === this.shownApproval) return;
    this.shownApproval = key;
    this.approval.hidden = !approval;
    this.approval.replaceChildren();
    if (!approval) return;
    // A wait the run's end cut short is drawn settled, not in the colour of one going on.
    this.approval.dataset.status = approval.status === "pending" && this.card.ended ? "undecided" : approval.status;
    if (approval.status !== "pending") {
      this.approval.append(element("p", "decision", decisionText(approval)));
    } else if (this.card.ended) {
      this.approval.append(element("p", "decision", "The run ended before anyone decided."));
    } else if (viewer) {
      this.approval.append(element("p", "decision", "Waiting for the session's owner to allow or deny this call."));
    } else {
      this.approval.append(this.askOwner());
    }
  }

  /** Allow and Deny, with an optional reason, for the session's owner. */
  askOwner() {
    const form = element("form", "ask");
    form.setAttribute("aria-label", `Approve the ${this.call.tool || "tool"} call`);
    form.append(element("p", "question", `This run wants to call ${this.call.tool || "a tool"} with the arguments above.`));
    const id = `reason-${this.card.run}-${this.call.id}`;
    const label = element("label", "", "Reason (optional)");
    label.htmlFor = id;
    const reason = element("input");
    reason.type = "text";
    reason.id = id;
    reason.autocomplete = "off";
    const allow = element("button", "primary allow", "Allow");
    allow.type = "submit";
    allow.value = "allow";
    const deny = element("button", "danger deny", "Deny");
    deny.type = "submit";
    deny.value = "deny";
    const row = element("div", "row");
    row.append(reason, allow, deny);
    form.append(label, row);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const decision = e.submitter?.value === "deny" ? "deny" : "allow";
      if (this.card.approve(this.call.call_id, decision, reason.value.trim() || undefined)) {
        for (const control of [reason, allow, deny]) control.disabled = true;
        e.submitter?.replaceChildren(decision === "allow" ? "Allowing…" : "Denying…");
      }
    });
    return form;
  }
}

function decisionText({ status, by, reason }) {
  const verb = status === "allow" ? "Allowed" : "Denied";
  const who = {
    timeout: " automatically: nobody answered in time",
    lost: " automatically: the wait for an answer was lost",
  }[by] ?? " by the session's owner";
  return `${verb}${who}${reason ? `: ${reason}` : "."}`;
}

const ENDS = { done: "Done", cancelled: "Stopped", failed: "Failed" };
const BADGES = { running: "Running", waiting: "Waiting for approval", ...ENDS };

function formatTokens(n, estimated) {
  return (estimated ? "~" : "") + Number(n).toLocaleString("en");
}

/** "Done in 2.1 s. 1,234 tokens (1,000 prompt, 234 completion)", estimates marked "~". */
function usageText(usage) {
  if (!usage || usage.total_tokens == null) return "";
  const est = usage.estimated === true;
  const parts = `${formatTokens(usage.prompt_tokens ?? 0, est)} prompt, ${formatTokens(usage.completion_tokens ?? 0, est)} completion`;
  return ` ${formatTokens(usage.total_tokens, est)} tokens (${parts}${est ? "; estimated" : ""}).`;
}

/** One run: its prompt, its blocks as the reducer has them, and how it ended. */
class Card {
  constructor(run, prompt) {
    this.run = run;
    this.touched = false; // the reader opened or closed reasoning themselves
    this.status = "running";
    this.ended = false;
    this.attempt = 1;
    this.views = new Map(); // block id -> its view
    this.ids = []; // block ids drawn, in order
    this.tools = new Map(); // call_id -> ToolView
    this.groups = []; // reasoning groups, to fold when the run ends
    this.last = null; // the last view drawn, to join consecutive reasoning
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
    this.note = element("p", "run-note", "");
    this.body = element("div", "run-body");
    this.footer = element("p", "run-foot", "");
    this.el.append(head, this.note, this.body, this.footer);
  }

  setPrompt(text) {
    this.prompt.textContent = text ?? (viewer ? "(prompts are not shared with viewers)" : "(sent from another tab or client)");
    this.prompt.classList.toggle("unknown", text == null);
  }

  /** Bring the card up to the run's state. */
  draw(run) {
    if (run.attempt !== this.attempt || !this.drawnPrefixOf(run.blocks)) this.restart(run.attempt);
    for (const block of run.blocks) this.drawBlock(block);
    if (run.status !== this.status) this.drawStatus(run);
    else if (this.ended) this.drawFooter(run);
  }

  /** Whether the blocks drawn are still the first blocks of the run (a retry clears them). */
  drawnPrefixOf(blocks) {
    const n = this.ids.length;
    return blocks.length >= n && (n === 0 || blocks[n - 1].id === this.ids[n - 1]);
  }

  restart(attempt) {
    this.attempt = attempt;
    this.views.clear();
    this.tools.clear();
    this.ids = [];
    this.groups = [];
    this.last = null;
    this.body.replaceChildren();
    this.note.textContent = attempt > 1 ? `Attempt ${attempt}: the run started over.` : "";
  }

  drawBlock(block) {
    let view = this.views.get(block.id);
    if (!view) {
      view = this.viewFor(block);
      this.views.set(block.id, view);
      this.ids.push(block.id);
      this.last = view;
    } else if (view.shown === block) {
      return; // unchanged since it was drawn
    }
    view.shown = block;
    view.update(block);
  }

  viewFor(block) {
    if (block.kind === "reasoning") {
      let group = this.last instanceof ThoughtView ? this.last.group : null;
      if (!group) {
        group = new ReasoningView(this);
        this.groups.push(group);
        this.body.append(group.el);
      }
      return new ThoughtView(group);
    }
    if (block.kind === "tool_call" || block.kind === "tool_result") {
      // A log without blocks names no call: its observation belongs to the action before it.
      const previous = !block.call_id && block.kind === "tool_result" && this.last?.tool;
      const known = block.call_id ? this.tools.get(block.call_id) : previous && !previous.result ? previous : undefined;
      const tool = known ?? new ToolView(this, block.tool);
      if (!known) {
        this.tools.set(block.call_id ?? `block ${block.id}`, tool);
        this.body.append(tool.el);
      }
      // The result shows inside its call's card: the view is the call's, updated by both.
      return { update: (b) => tool.update(b), tool };
    }
    const text = new TextView();
    this.body.append(text.el);
    return text;
  }

  drawStatus(run) {
    this.status = run.status;
    this.ended = run.status in ENDS;
    this.el.dataset.status = run.status;
    this.badge.textContent = BADGES[run.status] ?? run.status;
    for (const tool of new Set(this.tools.values())) tool.draw(); // their status depends on the run's
    if (this.ended) {
      this.stop?.remove();
      this.stop = null;
      if (!this.touched) for (const group of this.groups) group.el.open = false; // the answer matters now
    }
    this.drawFooter(run);
  }

  drawFooter(run) {
    if (!this.ended) {
      this.footer.textContent = "";
      return;
    }
    const [first, last] = times.get(this.run) ?? [];
    const took = first && last ? ` in ${((last - first) / 1000).toFixed(1)} s` : "";
    let text;
    if (run.status === "done") text = `Done${took}.${usageText(run.usage)}`;
    else if (run.status === "cancelled") text = `Stopped${took}: the run was cancelled.`;
    else text = `Failed${took}: ${run.error?.message || "the run failed"}${run.error?.code ? ` (${run.error.code})` : ""}`;
    if (this.footer.textContent !== text) this.footer.textContent = text;
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

  /** Offer Stop again: the frontend refused a request (perhaps the cancel), and the run goes on. */
  offerStop() {
    if (!this.stop?.disabled) return;
    this.stop.disabled = false;
    this.stop.textContent = "Stop";
    this.badge.textContent = BADGES[this.status] ?? this.status;
  }

  /** Send the owner's decision on a tool call; false if it could not be sent. */
  approve(callId, decision, reason) {
    try {
      tw.approve(this.run, callId, decision, reason);
      return true;
    } catch (err) {
      notice(`Could not send the decision: ${err.message || err}`, "notice error");
      return false;
    }
  }
}

function cardFor(run) {
  let card = cards.get(run);
  if (!card) {
    card = new Card(run, prompts[run]);
    cards.set(run, card);
    $("runs").append(card.el);
    $("empty").hidden = true;
  }
  return card;
}

// Deltas are drawn at most once a frame; anything else (a tool call, an approval, the
// end of a run) at once, so a card's status never lags behind its events.
const dirty = new Set(); // runs whose cards are behind the state
const times = new Map(); // run id -> [ts of its first frame, ts of its last]
let drawing = null; // the animation frame that will draw them

/** Draw what a frame changed in the session's state, which the client has folded it into. */
function update(frame, folded) {
  const before = state;
  state = folded;
  if (state === before) return; // a duplicate, or a frame the state does not hold
  if (frame.run && frame.ts) times.set(frame.run, [times.get(frame.run)?.[0] ?? frame.ts, frame.ts]);
  if (!frame.run || state.order.length < before.order.length || (before.epoch && state.epoch !== before.epoch)) {
    change(drawAll); // a gap, a snapshot or a new epoch: the state starts over
    return;
  }
  dirty.add(frame.run);
  if (frame.delta === true) schedule();
  else flush();
}

function schedule() {
  drawing ??= requestAnimationFrame(flush);
}

function flush() {
  if (drawing !== null) cancelAnimationFrame(drawing);
  drawing = null;
  change(() => {
    for (const run of dirty) if (state.runs[run]) cardFor(run).draw(state.runs[run]);
    dirty.clear();
  });
}

/** Draw every run of the state, and drop the cards of runs it no longer has. */
function drawAll() {
  for (const [run, card] of cards) {
    if (!state.runs[run]) {
      card.el.remove();
      cards.delete(run);
    }
  }
  for (const run of state.order) cardFor(run).draw(state.runs[run]);
  dirty.clear();
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
  // 4001 asks for a token instead; 4003 is final (shared/closecodes.py): a reconnect is refused again.
  $("retry").hidden = state !== "offline" || detail.code === 4001 || detail.code === 4003;
  $("share").disabled = !(tw?.session);
}

/** "3 watching": changed only when the count does, so a screen reader hears little. */
function showPresence({ sockets }) {
  if (!Number.isSafeInteger(sockets) || sockets < 1) return;
  const text = `${sockets.toLocaleString("en")} watching`;
  if ($("presence-text").textContent !== text) $("presence-text").textContent = text;
  $("presence").hidden = false;
}

let tw = null;

function open(session) {
  const options = {};
  if (token) options.token = () => token; // called on every connect: a new sign-in takes effect
  // A session joined without a position (a reload, a viewer link) starts with one
  // snapshot of its runs so far, not its whole log; reconnects resume after it.
  if (session) options.session = session;
  options.presence = true;
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
    if (client === tw) update(e.detail, client.folded);
  });
  client.addEventListener("snapshot", (e) => {
    if (client === tw) update(e.detail, client.folded); // the runs so far, drawn at once
  });
  client.addEventListener("presence", (e) => {
    if (client === tw) showPresence(e.detail);
  });
  client.addEventListener("error", (e) => {
    // Something asked of the client failed (a prompt or a cancel refused); it goes on.
    if (client !== tw) return;
    const { action, reason } = e.detail;
    if (action === "cancel") for (const card of cards.values()) card.offerStop();
    notice(`Could not ${action === "cancel" ? "stop the run" : `send the ${action}`}: ${reason}`, "notice error");
  });
  client.addEventListener("gap", (e) => {
    if (client !== tw) return;
    update(e.detail, client.folded); // the state starts over: the frontend sends what it still has
    notice(`Some events could not be recovered (${e.detail.reason}); the stream goes on from here.`);
  });
  client.addEventListener("message", (e) => {
    if (client !== tw) return;
    const message = e.detail;
    if (message.type === "session") joined(message.session);
    else if (message.type === "queued" && pending.has(message.key)) {
      // The frontend names this tab's prompt's run: label its card (drawn already if
      // its first event came first), not whichever run another tab started.
      remember(message.run, pending.get(message.key));
      pending.delete(message.key);
      cards.get(message.run)?.setPrompt(prompts[message.run]);
    } else if (message.type === "error") {
      // This tab's prompt refused (over the rate, a busy session...) goes back in the
      // box, unless something else has been typed there since.
      const text = pending.get(message.key);
      pending.delete(message.key);
      const restored = text !== undefined && !$("prompt").value.trim();
      if (restored) {
        $("prompt").value = text;
        fit();
      }
      const said = message.message || "The frontend refused that.";
      notice(restored ? `Not sent: ${said.replace(/\.$/, "")}. It is back in the box.` : said, "notice error");
      for (const card of cards.values()) {
        for (const tool of card.tools.values()) tool.reopen();
        card.offerStop();
      }
    }
  });
  tw = client;
  client.connect().catch(() => {}); // failures arrive as "closed" state events
}

function joined(session) {
  document.body.dataset.session = session;
  showSession(session);
  $("share").disabled = false;
  if (viewer) {
    const shows = answerOnly ? " It shows the answers only: no reasoning, tool arguments or results." : "";
    $("readonly-text").textContent = `Following session ${session} live. This view cannot prompt or stop runs.${shows}`;
  }
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
  times.clear();
  dirty.clear();
  state = initialState();
  pending.clear();
  $("presence").hidden = true;
  $("presence-text").textContent = "";
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
  let key;
  try {
    key = tw.prompt(text);
  } catch (err) {
    notice(`Not sent: ${err.message || "not connected"}. It is still in the box.`, "notice error");
    return;
  }
  if (!key) return; // not taken (closed, or too many waiting): the client said why; the text stays
  pending.set(key, text);
  // A prompt refused never gets its run named: keep the latest only.
  if (pending.size > KEPT_PROMPTS) pending.delete(pending.keys().next().value);
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

$("share").addEventListener("click", () => {
  if (!tw?.session) return;
  $("share-dialog").showModal();
  makeLink();
});

// The owner chooses what the link shows; each choice mints its own token.
for (const choice of document.querySelectorAll("#share-scope input")) {
  choice.addEventListener("change", makeLink);
}

let minting = 0; // the latest link asked for: an earlier answer that comes late is dropped

async function makeLink() {
  const session = tw?.session;
  if (!session) return;
  const mint = ++minting;
  const scope = document.querySelector("#share-scope input:checked")?.value ?? "full";
  $("share-scope").hidden = viewer || !token;
  $("share-ready").hidden = true;
  $("share-message").hidden = false;
  $("share-message").textContent = "Making a link…";
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
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ scope }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
    if (mint !== minting) return;
    link.hash = new URLSearchParams({ session, token: body.token }).toString();
    const until = new Date(body.expires * 1000).toLocaleString();
    $("share-what").textContent =
      body.scope === "answer"
        ? "Anyone with this link sees the session's answers live, read-only, from any frontend: no reasoning, tool arguments or results. It cannot prompt or stop runs."
        : "Anyone with this link sees the session live, read-only, from any frontend. It cannot prompt or stop runs.";
    shared(link, `The link works until ${until}.`);
  } catch (err) {
    if (mint === minting) $("share-message").textContent = `Could not make a link: ${err.message}`;
  }
}

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
