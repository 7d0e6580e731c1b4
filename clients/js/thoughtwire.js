/**
 * thoughtwire: a dependency-free client for a thoughtwire gateway's event sockets.
 *
 * It follows one session on `/ws/agent-thoughts`, keeps its position `(session,
 * epoch, seq)`, and across drops, restarts and frontends resumes from it, so that
 * every event reaches the application exactly once and in seq order. It sends the
 * session's prompts and cancellations, and refreshes its token in the socket.
 *
 * Browsers cannot set headers on a WebSocket, so a token travels as the subprotocol
 * `bearer.<token>` beside `thoughtwire.v1`; it is never put into a URL.
 *
 * `reduce` folds the session's frames into its state (runs, their blocks, tool calls
 * and approvals); a client keeps that state as `folded`. It follows the same rules as
 * the server's Python reducer (shared/reducer.py): both pass
 * clients/conformance/reducer.json.
 *
 * @module thoughtwire
 */

const SUBPROTOCOL = "thoughtwire.v1";
const BEARER = "bearer.";
const DEFAULT_PATH = "/ws/agent-thoughts";
const UNAUTHORIZED = 4001;
const FORBIDDEN = 4003;
const RATE_LIMITED = 4029;
/** Close codes after which reconnecting cannot help (the server's shared/closecodes.py). */
const FINAL = new Set([1000, 1008, 1009, UNAUTHORIZED, FORBIDDEN]);
/** Prompts, cancellations and approvals held while no socket is open; more are refused. */
const MAX_PENDING = 64;
/** A socket its frontend kept this long (ms) had a token that worked: its 4001 is an expiry. */
const TOKEN_LASTED_MS = 10000;
/**
 * A socket up this long (ms) was healthy: after it closes, backoff starts afresh. One
 * closed sooner (greeted, then 1013 as its frontend's event log is unreachable) goes on
 * backing off, or every client would come back several times a second.
 */
const STEADY_MS = 10000;
/** Prompts whose run is remembered (`runOf`), the latest. */
const RUNS_KEPT = 1024;
/** Error codes only a prompt gets: the oldest prompt waiting is refused, not sent again. */
const PROMPT_REFUSED = new Set(["busy", "budget", "empty_prompt", "too_long"]);
/** The events that end a run. */
const TERMINAL = new Set(["done", "error", "cancelled"]);
/** What a prompt does while the session has an unfinished run (docs/protocol.md). */
const MULTITASK = new Set(["reject", "enqueue", "interrupt"]);
/** The answers to an approval. */
const DECISIONS = new Set(["allow", "deny"]);

/**
 * The query that asks a frontend for a session from a position.
 *
 * @param {string | null} session the session to follow; none: a new one
 * @param {string | null} epoch the epoch of `seq`, when known
 * @param {number | null} seq the last seq received; null: follow from now on
 * @returns {URLSearchParams}
 */
export function positionQuery(session, epoch, seq) {
  const query = new URLSearchParams();
  if (session) {
    query.set("session", session);
    if (seq !== null && seq !== undefined) query.set("after", String(seq));
    if (epoch && seq !== null && seq !== undefined) query.set("epoch", epoch);
  }
  return query;
}

/** How a join without a position, or a resume the log no longer holds, is caught up. */
const REPLAYS = new Set(["snapshot", "raw"]);

/**
 * A socket URL from a frontend's base URL (http(s) or ws(s)) or a full socket URL.
 *
 * @param {string} base a base URL, whose socket path is `path`, or a full socket URL
 * @param {string} path the socket path for base URLs
 * @param {URLSearchParams} query parameters to set
 * @returns {string}
 */
export function socketUrl(base, path, query) {
  const url = new URL(base, globalThis.location?.href);
  if (url.protocol === "http:") url.protocol = "ws:";
  else if (url.protocol === "https:") url.protocol = "wss:";
  if (url.pathname === "/" || url.pathname === "") url.pathname = path;
  for (const [name, value] of query) url.searchParams.set(name, value);
  return url.href;
}

/**
 * One session followed over a thoughtwire gateway, across reconnects.
 *
 * Events it dispatches, each a `CustomEvent` whose `detail` is:
 * - `state`: `{state, gap?, code?, reason?, attempt?, delay?}`; `state` is
 *   `connecting`, `connected`, `reconnecting`, `resumed` or `closed`. A connection
 *   opened from a position is `resumed`; if the frontend then finds events lost, a
 *   second `resumed` follows with the `gap`.
 * - `event`: every event of the session (it has `seq`), exactly once, in seq order;
 *   `folded` already includes it.
 * - `gap`: a gap reply: events after `after` are lost; the stream goes on at `next`
 *   of `epoch`.
 * - `snapshot`: a snapshot reply: the session's state at its `seq`, which `folded` has
 *   become (a join without a position, or a resume the log no longer holds); the
 *   events after it follow as `event`s.
 * - `presence`: who watches the session (`sockets`, `users`, `names`), with
 *   `presence: true`.
 * - `message`: every other frame from the server (`session`, `error`, `ping`, ...).
 * - `error`: `{action, code?, reason}`: something the client was asked to do failed
 *   (a prompt, cancel or approve refused, a token callback that threw); the client
 *   goes on.
 */
export class Thoughtwire extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string | string[]} [options.urls] frontends to try in turn; default: this page's origin
   * @param {string} [options.path] the socket path appended to base URLs
   * @param {string | (() => string | Promise<string>)} [options.token] a token, or a
   *   callback that returns a fresh one, called on every connect
   * @param {string} [options.session] continue or follow this session; default: a new one
   * @param {number} [options.after] start after this seq (with `session`); default: from now
   *   on, starting with the session's `snapshot` when it has events
   * @param {"snapshot" | "raw"} [options.replay] `raw`: never a snapshot (a join without a
   *   position sees only what comes after it; a trimmed log is a `gap`); default `snapshot`
   * @param {boolean} [options.presence] ask for `presence` frames (who watches the session)
   * @param {string} [options.epoch] the epoch of `after`
   * @param {{initial?: number, max?: number}} [options.backoff] reconnect delays, ms, full jitter
   * @param {number} [options.maxReconnects] failed reconnects in a row before giving up
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket class (outside browsers)
   * @param {number} [options.heartbeat] ms between the frames that tell a frontend this
   *   client is alive, so a quiet session is not closed as idle; 0: none
   */
  constructor(options = {}) {
    super();
    const urls = options.urls ?? defaultUrl();
    this.urls = typeof urls === "string" ? [urls] : [...urls];
    if (this.urls.length === 0) throw new TypeError("urls: give at least one frontend");
    this.path = options.path ?? DEFAULT_PATH;
    this.replay = options.replay ?? "snapshot";
    if (!REPLAYS.has(this.replay)) throw new TypeError("replay: snapshot or raw");
    this.presence = options.presence === true;
    this.backoff = { initial: 250, max: 10000, ...options.backoff };
    this.maxReconnects = options.maxReconnects ?? 50;
    // Well inside a frontend's idle timeout (15 min by default), which closes a socket
    // that saw no frame either way, and a follower of a quiet session sends none.
    this.heartbeat = options.heartbeat ?? 240000;
    /** @type {string | null} the session followed, once known */
    this.session = options.session ?? null;
    /** @type {string | null} the epoch of `seq` */
    this.epoch = options.session ? (options.epoch ?? null) : null;
    /** @type {number | null} the last seq delivered; null: following from now on, none yet */
    this.seq = options.session ? (options.after ?? null) : null;
    /** @type {string} `idle` until `connect()`, then the last state dispatched */
    this.state = "idle";
    /** @type {object} the session's frames folded by `reduce`, up to the last `event` */
    this.folded = initialState();
    /** @type {string | null} the socket URL in use or last used */
    this.url = null;
    this._token = options.token;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._ws = null;
    this._admitted = false; // the open socket's greeting has come: the frontend took it
    this._resuming = false; // the open socket was asked for a position
    this._firstFrame = false; // nothing has come since its greeting
    this._wrote = null; // the last write on the open socket, to name a refusal
    this._authRetried = false;
    this._admittedAt = 0;
    this._failures = 0;
    this._step = 0; // reconnect delays since the last steady socket
    this._index = 0;
    this._pending = [];
    // A run's cancel, sent again on each socket until the run ends: a frontend stops
    // reading before it closes (a drain, a slow reader), so one written in that moment
    // is never read. The cancel of every run is not: it would stop later ones.
    this._cancels = new Map();
    // Prompts by key, sent again on each socket until the frontend's `queued` reply names
    // their run, for the same reason; their key makes the frontend run each once.
    this._prompts = new Map();
    this._queued = new Map(); // a prompt's key -> its run, the latest RUNS_KEPT
    // Approvals by run and call, sent again on each socket until settled: the run's
    // `decision` for the call, the run's end, or a refusal. One lost the same way would
    // leave the run waiting until the timeout denies the call.
    this._approvals = new Map();
    // The approvals sent again on the open socket: a `not_waiting` naming one says the
    // first was applied after all, which is no refusal to report.
    this._resent = new Set();
    this._timer = null;
    this._beat = null;
    this._watch = null; // drops a socket the frontend has gone silent on (_welcome)
    this._heardAt = 0; // when the last frame came
    this._done = false;
    this._opened = null;
  }

  /**
   * Open the first connection.
   *
   * @returns {Promise<Thoughtwire>} resolves once a frontend has taken the socket and
   *   the session is known; rejects if the client closes for good before that
   */
  connect() {
    if (this._opened === null) {
      this._opened = new Promise((resolve, reject) => {
        this._resolve = resolve;
        this._reject = reject;
      });
      this._setState("connecting");
      this._open();
    }
    return this._opened;
  }

  /**
   * Send a prompt to the session; held until a socket is open.
   *
   * @param {string} text the prompt
   * @param {{key?: string, multitask?: "reject" | "enqueue" | "interrupt"}} [options]
   *   `key`: an idempotency key, the same key runs once; `multitask`: what to do if
   *   the session has an unfinished run (refuse with `busy`, run after it, or cancel
   *   it first); default: the server's `THOUGHTWIRE_MULTITASK`
   * @returns {string | undefined} the prompt's key: `runOf(key)` is its run once the
   *   frontend's `queued` reply (a `message`) has named it
   */
  prompt(text, { key, multitask } = {}) {
    const frame = { type: "prompt", content: String(text), key: key ?? newKey() };
    if (multitask !== undefined && multitask !== null) {
      if (!MULTITASK.has(multitask)) {
        throw new TypeError(`multitask: one of ${[...MULTITASK].join(", ")}`);
      }
      frame.multitask = multitask;
    }
    if (this._done || this._prompts.size >= MAX_PENDING) {
      const reason = this._done ? "the client is closed" : "too many prompts wait for their runs";
      this._emit("error", { action: "prompt", reason });
      return;
    }
    this._prompts.set(frame.key, frame);
    this._write("prompt", frame); // in order with other writes: an earlier cancel spares its run
    return frame.key;
  }

  /**
   * The run of the prompt sent with `key`, once the frontend has named it; otherwise null.
   * Other writers of the session (another tab, the HTTP API) start runs too: this tells
   * which is the prompt's, whatever order their events come in.
   *
   * @param {string} key
   * @returns {string | null}
   */
  runOf(key) {
    return this._queued.get(key) ?? null;
  }

  /**
   * Answer a tool call's `approval`: allow or deny it, with an optional reason.
   *
   * It is sent again on each new socket until the run's `decision` for the call comes,
   * the run ends, or the frontend refuses it (at most 64 are kept: past that, the oldest
   * is not sent again). A refusal (a call not waiting, `not_waiting`, naming `run` and
   * `call_id`) comes as a `message` with type `error`, except for an approval sent again,
   * whose first was applied; a viewer's approve is an `error` event (the frontend closes
   * with 4003).
   *
   * @param {string} run the run that waits
   * @param {string} callId the approval's `call_id`
   * @param {"allow" | "deny"} decision
   * @param {string} [reason] shown beside the decision
   */
  approve(run, callId, decision, reason) {
    if (!DECISIONS.has(decision)) throw new TypeError("decision: allow or deny");
    const frame = { type: "approve", run, call_id: callId, decision };
    if (reason !== undefined && reason !== null) frame.reason = String(reason);
    // Not taken out of `_resent`: replies come in the order of the frames, so the first
    // `not_waiting` for the call is that of the one sent again.
    const call = callKey(run, callId);
    if (!this._write("approve", frame)) return;
    this._approvals.delete(call);
    this._approvals.set(call, frame);
    // The oldest goes: its run's end may have gone by in a gap.
    if (this._approvals.size > MAX_PENDING) this._approvals.delete(this._approvals.keys().next().value);
  }

  /**
   * Cancel a run of the session, or without `run` every unfinished one.
   *
   * @param {string} [run]
   */
  cancel(run) {
    if (!run) {
      this._write("cancel", { type: "cancel" });
      return;
    }
    const frame = { type: "cancel", run };
    if (!this._done) {
      this._cancels.delete(run);
      this._cancels.set(run, frame);
      // The oldest goes: its run's end may have gone by in a gap.
      if (this._cancels.size > MAX_PENDING) this._cancels.delete(this._cancels.keys().next().value);
    }
    if (this._done || (this._ws !== null && this._admitted)) this._write("cancel", frame);
  }

  /** Get a fresh token from the callback and hand it to the open socket, before the old one expires. */
  async refresh() {
    const token = await this._freshToken();
    if (token && this._ws !== null && this._admitted) {
      this._ws.send(JSON.stringify({ type: "auth", token }));
    }
  }

  /** Close for good: no reconnect. Idempotent. */
  close() {
    if (this._done) return;
    const ws = this._ws;
    this._ws = null;
    ws?.close(1000, "client closed");
    this._finish(1000, "closed by the client");
  }

  // --- connecting -----------------------------------------------------------

  async _open() {
    let token;
    try {
      token = await this._freshToken();
    } catch (err) {
      this._emit("error", { action: "token", reason: messageOf(err) });
      this._retry(0, "the token callback failed");
      return;
    }
    if (this._done) return;
    this._resuming = this.session !== null && this.seq !== null;
    const query = positionQuery(this.session, this.epoch, this.seq);
    if (this.replay === "raw") query.set("replay", "raw");
    if (this.presence) query.set("presence", "1");
    query.set("ping", "1"); // frames to count on, so that a dead link shows (see _welcome)
    let ws;
    try {
      this.url = socketUrl(this.urls[this._index], this.path, query);
      ws = new this._WebSocket(this.url, token ? [SUBPROTOCOL, BEARER + token] : [SUBPROTOCOL]);
    } catch (err) {
      this._finish(1008, messageOf(err)); // a malformed URL or token: no retry can help
      return;
    }
    this._ws = ws;
    this._admitted = false;
    this._wrote = null;
    ws.onmessage = (message) => ws === this._ws && this._receive(message.data);
    ws.onclose = (close) => ws === this._ws && this._closed(close.code, close.reason);
  }

  async _freshToken() {
    const token = typeof this._token === "function" ? await this._token() : this._token;
    if (token !== undefined && token !== null && typeof token !== "string") {
      throw new TypeError("a token must be a string");
    }
    return token || null;
  }

  _closed(code, reason) {
    this._ws = null;
    clearInterval(this._beat);
    clearInterval(this._watch);
    reason ||= code === 1006 ? "the connection failed or was lost" : "";
    const { _admitted: admitted, _wrote: wrote } = this;
    if (admitted && (code !== UNAUTHORIZED || Date.now() - this._admittedAt >= TOKEN_LASTED_MS)) {
      // The last fresh token worked: a later 4001 may have another. A 4001 just after
      // the door opened means the callback's tokens do not work, and is final.
      this._authRetried = false;
    }
    if (admitted && Date.now() - this._admittedAt >= STEADY_MS) this._step = 0;
    if (code === FORBIDDEN && admitted && wrote !== null) {
      // The token may read this session but not write to it (a viewer): the socket
      // was closed for the write alone, so the application hears of the refusal and
      // the client goes on following.
      this._cancels.clear(); // refused too, and would be again
      this._prompts.clear();
      this._approvals.clear();
      this._resent.clear();
      this._emit("error", { action: wrote, code, reason });
      this._retry(code, reason, 0);
    } else if (code === UNAUTHORIZED && typeof this._token === "function" && !this._authRetried) {
      this._authRetried = true; // once: a callback that keeps failing is final
      this._retry(code, reason, 0);
    } else if (FINAL.has(code)) {
      this._finish(code, reason);
    } else {
      this._retry(code, reason);
    }
  }

  _retry(code, reason, delay) {
    if (this._done) return;
    if (this._failures >= this.maxReconnects) {
      this._finish(code, `gave up after ${this._failures} reconnects: ${reason}`);
      return;
    }
    const attempt = ++this._failures;
    const step = ++this._step;
    // The next frontend in the list: the one that dropped the socket may be restarting.
    this._index = (this._index + 1) % this.urls.length;
    const ceiling = Math.min(this.backoff.max, this.backoff.initial * 2 ** Math.min(step, 31) / 2);
    // Full jitter spreads clients out; a rate-limited one pauses for about the longest delay.
    const pause = code === RATE_LIMITED ? this.backoff.max / 2 : 0;
    const wait = delay ?? pause + Math.random() * (pause || ceiling);
    this._setState("reconnecting", { code, reason, attempt, delay: wait });
    this._timer = setTimeout(() => {
      this._timer = null;
      this._open();
    }, wait);
  }

  _finish(code, reason) {
    this._done = true;
    clearTimeout(this._timer);
    clearInterval(this._beat);
    clearInterval(this._watch);
    this._pending = [];
    this._prompts.clear();
    this._cancels.clear();
    this._approvals.clear();
    this._resent.clear();
    this._setState("closed", { code, reason });
    const error = new Error(`closed (${code}): ${reason}`);
    Object.assign(error, { code, reason });
    this._reject?.(error); // a no-op once connect() has resolved
  }

  // --- receiving ------------------------------------------------------------

  _receive(data) {
    this._heardAt = Date.now();
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // this endpoint sends JSON only
    }
    if (message?.type === "snapshot") {
      this._snapshot(message);
    } else if (typeof message?.seq === "number") {
      this._event(message);
    } else if (message?.type === "gap") {
      this._gap(message);
    } else {
      // A `ping` gets no answer: it is there to be heard (_welcome), and the frontend needs
      // none; an answer counts against the user's rate as every frame does, so every quiet
      // tab answering a frontend that pings often spent the rate its prompts needed.
      if (message?.type === "session") this._welcome(message);
      else if (message?.type === "presence") this._emit("presence", message);
      else if (message?.type === "queued") this._wasQueued(message);
      else if (namesApproval(message)) {
        // The reply to an approve, naming it: settled either way, not sent again.
        const call = callKey(message.run, message.call_id);
        this._approvals.delete(call);
        // One sent again on this socket: the first was applied after all (or decided
        // elsewhere meanwhile, as the run's `decision` event says). No refusal.
        if (this._resent.delete(call) && message.code === "not_waiting") return;
      } else if (message?.type === "error" && this._prompts.has(message.key)) {
        // A refused prompt (over the rate too, or it would run on a later socket, long
        // after its sender gave up on it) is not sent again.
        this._prompts.delete(message.key);
      } else if (message?.type === "error" && message.key === undefined && PROMPT_REFUSED.has(message.code)) {
        // From a frontend that does not name the prompt: replies come in the order the
        // prompts were read, so this one is the oldest's.
        this._prompts.delete(this._prompts.keys().next().value);
      }
      this._emit("message", message);
    }
  }

  _welcome(message) {
    if (this.session === null) this.seq = 0; // a new session: all of it is ours
    this.session = message.session;
    this._admitted = true;
    this._firstFrame = true;
    clearInterval(this._beat);
    if (this.heartbeat > 0) {
      const ws = this._ws;
      this._beat = setInterval(() => ws?.send(JSON.stringify({ type: "pong" })), this.heartbeat);
    }
    clearInterval(this._watch);
    if (Number.isFinite(message.ping) && message.ping > 0) {
      // The frontend pings after `ping` s without a frame either way, so something comes
      // at least that often, however often this client beats. A link that died without a
      // close (a laptop asleep, a NAT that forgot it, a frontend's host gone) says nothing
      // for minutes: after two and a half intervals of silence it is dropped and the
      // session resumed.
      const ws = this._ws;
      const silence = 2500 * message.ping;
      this._watch = setInterval(() => {
        if (ws !== this._ws || Date.now() - this._heardAt <= silence) return;
        ws.onmessage = ws.onclose = null;
        ws.close(4000, "no frame from the frontend");
        this._closed(1006, `no frame from the frontend in ${silence / 1000} s`);
      }, silence / 4);
    }
    this._failures = 0;
    this._admittedAt = Date.now();
    this._setState(this._resuming ? "resumed" : "connected", this._resuming ? { gap: null } : {});
    const pending = this._pending;
    this._pending = [];
    // Prompts an earlier socket took may not have been read; the others wait in order.
    const queued = new Set(pending.map(([, frame]) => frame));
    for (const frame of this._prompts.values()) if (!queued.has(frame)) this._send("prompt", frame);
    for (const [action, frame] of pending) this._send(action, frame);
    for (const frame of this._cancels.values()) this._send("cancel", frame);
    // Approvals an earlier socket took may not have been read either: sent again last.
    this._resent = new Set();
    for (const [call, frame] of this._approvals) {
      if (queued.has(frame)) continue;
      this._resent.add(call);
      this._send("approve", frame);
    }
    this._resolve?.(this);
  }

  _event(event) {
    this._firstFrame = false;
    if (this.seq !== null && event.epoch === this.epoch && event.seq <= this.seq) return;
    this.epoch = event.epoch;
    this.seq = event.seq;
    this.folded = reduce(this.folded, event);
    if (TERMINAL.has(event.type)) this._cancels.delete(event.run);
    this._settle(event);
    this._emit("event", event);
  }

  /** An event that settles approvals: their call's `decision`, or their run's end. */
  _settle(event) {
    if (event.type === "decision") {
      this._approvals.delete(callKey(event.run, event.call_id));
    } else if (TERMINAL.has(event.type)) {
      for (const [call, frame] of this._approvals) {
        if (frame.run === event.run) this._approvals.delete(call);
      }
    }
  }

  _snapshot(snapshot) {
    // A reply, not an event: it replaces the state and is a position to resume from.
    // One not past the position held (same epoch) adds nothing; one that is not a
    // whole state is ignored, as the reducer ignores it.
    this._firstFrame = false;
    const { seq, epoch } = snapshot;
    if (!Number.isSafeInteger(seq) || !(epoch === null || typeof epoch === "string")) return;
    if (this.seq !== null && epoch === this.epoch && seq <= this.seq) return;
    const folded = reduce(this.folded, snapshot);
    if (folded === this.folded) return;
    this.folded = folded;
    this.epoch = epoch;
    this.seq = seq;
    this._emit("snapshot", snapshot);
  }

  /** A `queued` reply: the prompt with that key has its run, and is not sent again. */
  _wasQueued({ key, run }) {
    if (typeof key !== "string" || typeof run !== "string") return;
    this._prompts.delete(key);
    this._queued.delete(key);
    this._queued.set(key, run);
    if (this._queued.size > RUNS_KEPT) this._queued.delete(this._queued.keys().next().value);
  }

  _gap(gap) {
    // The stream goes on at `next` of `epoch`: that is the position from now on. A null
    // epoch (the log is gone) is the start of no epoch: keeping the old one would have the
    // next resume name a position the frontend cannot confirm, and be told the loss again.
    if (typeof gap.epoch === "string" || gap.epoch === null) this.epoch = gap.epoch;
    if (Number.isInteger(gap.next)) this.seq = gap.next - 1;
    this.folded = reduce(this.folded, gap);
    this._emit("gap", gap);
    if (this._firstFrame && this._resuming) this._setState("resumed", { gap });
    this._firstFrame = false;
  }

  // --- sending --------------------------------------------------------------

  /** Send `frame` now, or once a socket is open; false if it was refused (an `error` event). */
  _write(action, frame) {
    if (this._done) {
      this._emit("error", { action, reason: "the client is closed" });
    } else if (this._ws !== null && this._admitted) {
      this._send(action, frame);
      return true;
    } else if (this._pending.length < MAX_PENDING) {
      this._pending.push([action, frame]);
      return true;
    } else {
      this._emit("error", { action, reason: "too many messages wait for a connection" });
    }
    return false;
  }

  _send(action, frame) {
    this._wrote = action;
    this._ws.send(JSON.stringify(frame));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function defaultUrl() {
  if (globalThis.location?.origin === undefined) {
    throw new TypeError("urls: give the frontends to connect to (there is no page origin here)");
  }
  return globalThis.location.origin;
}

/** A prompt's idempotency key: 128 random bits, in hex (randomUUID needs a secure context). */
function newKey() {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The key of an approval: its run and call (a run id has no NUL). */
function callKey(run, callId) {
  return `${run}\u0000${callId}`;
}

/** Whether `message` is an `error` reply naming the approve it refuses. */
function namesApproval(message) {
  return message?.type === "error" && typeof message.run === "string" && typeof message.call_id === "string";
}

function messageOf(err) {
  return err instanceof Error ? err.message : String(err);
}

// --- the reducer --------------------------------------------------------------
//
// A session's frames folded into its state, as shared/reducer.py folds them: the same
// rules, the same conformance file (clients/conformance/reducer.json). `reduce` never
// changes its input: it returns the same state when a frame changes nothing, and
// otherwise a new one that shares every part it left alone (treat states as read-only).

/** The block kind each content event belongs to. */
const KINDS = new Map([
  ["thinking", "reasoning"],
  ["answer", "text"],
  ["tool_input", "tool_call"],
  ["action", "tool_call"],
  ["observation", "tool_result"],
]);
/** The run statuses that end a run. */
const ENDED = new Set(["done", "failed", "cancelled"]);
/** Fields an event copies onto its block when it carries them. */
const DETAILS = new Map([
  ["tool_input", ["tool", "call_id"]],
  ["action", ["tool", "call_id", "arguments"]],
  ["observation", ["tool", "call_id", "is_error"]],
  ["approval", ["tool", "call_id", "arguments"]],
]);

/**
 * The state before any frame: `{epoch: null, seq: 0, runs: {}, order: []}`.
 *
 * @returns {object}
 */
export function initialState() {
  return { epoch: null, seq: 0, runs: {}, order: [] };
}

/**
 * `frames` reduced in turn, from `state` (by default the initial state).
 *
 * @param {Iterable<object>} frames decoded frames
 * @param {object} [state]
 * @returns {object}
 */
export function fold(frames, state) {
  let folded = state ?? initialState();
  for (const frame of frames) folded = reduce(folded, frame);
  return folded;
}

/**
 * The state after `frame`; `state` itself when the frame changes nothing.
 *
 * Events apply once each by `seq` within an epoch; an event of another epoch, or a
 * `gap`, starts from the initial state; a `snapshot` replaces the state; a `retry`
 * drops what the run's earlier attempt showed.
 *
 * @param {object} state a state from `initialState`, `reduce` or a snapshot
 * @param {object} frame a decoded frame
 * @returns {object}
 */
export function reduce(state, frame) {
  if (!isRecord(frame)) return state;
  if (frame.type === "gap") return initialState(); // the server then sends what the log has
  if (frame.type === "snapshot") {
    return isState(frame.state) ? structuredClone(frame.state) : state;
  }
  const seq = frame.seq;
  const epoch = frame.epoch ?? null;
  // A seq is a whole number up to 2^53-1 (so `1.0` is 1, as it is once parsed);
  // an epoch is a string or null. Anything else is a reply, or no event.
  if (!Number.isSafeInteger(seq) || !(epoch === null || typeof epoch === "string")) return state;
  if (state.epoch !== null && epoch !== state.epoch) state = initialState();
  if (seq <= state.seq) return state; // seen already
  if (Number.isSafeInteger(frame.from_seq) && frame.from_seq <= state.seq) {
    frame = unseen(frame, state.seq - frame.from_seq + 1);
  }
  return applyEvent(state, frame, seq);
}

/**
 * A merged delta (`from_seq`..`seq`, sent to a slow viewer) less its first `seen`
 * events' content. `lengths` counts code points, as Python does; without it the frame
 * applies whole.
 */
function unseen(frame, seen) {
  const { content, lengths } = frame;
  if (
    typeof content !== "string" ||
    !Array.isArray(lengths) ||
    lengths.length !== frame.seq - frame.from_seq + 1 ||
    !lengths.every((n) => Number.isSafeInteger(n) && n >= 0)
  ) {
    return frame;
  }
  const cut = lengths.slice(0, seen).reduce((a, n) => a + n, 0);
  return { ...frame, content: Array.from(content).slice(cut).join("") };
}

function applyEvent(state, frame, seq) {
  const next = { ...state, epoch: frame.epoch ?? null, seq };
  const runId = frame.run;
  if (typeof runId !== "string") return next;
  let run = Object.hasOwn(state.runs, runId) ? state.runs[runId] : null;
  if (run === null) {
    run = newRun(runId);
    next.order = [...state.order, runId];
  }
  const handler = HANDLERS.get(frame.type) ?? ((r) => r); // an unknown type moves the position only
  next.runs = { ...state.runs, [runId]: handler(run, frame, seq) };
  return next;
}

function newRun(runId) {
  return {
    run: runId,
    status: "running",
    attempt: 1,
    blocks: [],
    usage: null,
    error: null,
    finish_reason: null,
  };
}

function newBlock(id, kind) {
  const block = { id, kind, text: "", done: false };
  if (kind === "tool_call") {
    Object.assign(block, { tool: null, call_id: null, input: "", arguments: null, approval: null });
  } else if (kind === "tool_result") {
    Object.assign(block, { tool: null, call_id: null, is_error: false });
  }
  return block;
}

/** An event's content as text: a string as it is; anything else adds nothing. */
function textOf(content) {
  return typeof content === "string" ? content : "";
}

/** The fields of `DETAILS` for `type` the frame carries, onto `block`; a call_id only as a string. */
function copyDetails(block, frame, type) {
  for (const name of DETAILS.get(type) ?? []) {
    if (!Object.hasOwn(frame, name)) continue;
    if (name !== "call_id" || typeof frame[name] === "string") block[name] = frame[name];
  }
}

function content(run, frame, seq) {
  const kind = KINDS.get(frame.type);
  if (typeof frame.block !== "string") return v1Content(run, frame, seq, kind);
  const index = indexOf(run.blocks, frame.block);
  const block = index === null ? newBlock(frame.block, kind) : run.blocks[index];
  if (block.kind !== kind) return run; // another kind's block: the event is not about it
  return put(run, index, fill(block, frame, frame.delta === true));
}

/** An event of a log without blocks: a whole item, but answers join the open text block. */
function v1Content(run, frame, seq, kind) {
  const blocks = run.blocks;
  if (kind === "text") {
    const last = blocks.at(-1);
    if (last !== undefined && last.kind === "text" && !last.done) {
      return put(run, blocks.length - 1, fill(last, frame, true));
    }
    return put(run, null, fill(newBlock(`seq${seq}`, kind), frame, true));
  }
  return put(run, null, fill(newBlock(`seq${seq}`, kind), frame, false));
}

function fill(block, frame, delta) {
  const field = frame.type === "tool_input" ? "input" : "text";
  const text = textOf(frame.content);
  const next = delta
    ? { ...block, [field]: block[field] + text }
    : { ...block, [field]: text, done: true };
  copyDetails(next, frame, frame.type);
  return next;
}

function blockEnd(run, frame) {
  const index = indexOf(run.blocks, frame.block);
  if (index === null || run.blocks[index].done) return run;
  return put(run, index, { ...run.blocks[index], done: true });
}

function approval(run, frame, seq) {
  const found = toolCall(run, frame, seq);
  if (found === null) return run;
  const [index, block] = found;
  const next = { ...block, approval: { status: "pending", reason: null, by: null } };
  copyDetails(next, frame, "approval");
  return withStatus(put(run, index, next), "waiting");
}

function decision(run, frame, seq) {
  const found = toolCall(run, frame, seq);
  if (found === null) return run;
  const [index, block] = found;
  const approval = {
    status: frame.decision ?? null,
    reason: frame.reason ?? null,
    by: frame.by ?? null,
  };
  return withStatus(put(run, index, { ...block, approval }), "running");
}

/**
 * The tool-call block an approval or decision is about: by its block, else its call_id
 * (a string); null when its block is of another kind.
 */
function toolCall(run, frame, seq) {
  const blocks = run.blocks;
  let index = indexOf(blocks, frame.block);
  if (index === null && typeof frame.call_id === "string") {
    const found = blocks.findIndex((b) => b.kind === "tool_call" && b.call_id === frame.call_id);
    index = found < 0 ? null : found;
  }
  if (index !== null) return blocks[index].kind === "tool_call" ? [index, blocks[index]] : null;
  const id = typeof frame.block === "string" ? frame.block : `seq${seq}`;
  return [null, newBlock(id, "tool_call")];
}

function withStatus(run, status) {
  // An approval or decision that comes after the run's end does not bring it back.
  return ENDED.has(run.status) ? run : { ...run, status };
}

function retry(run, frame) {
  return {
    ...run,
    status: "running",
    attempt: Number.isSafeInteger(frame.attempt) ? frame.attempt : run.attempt + 1,
    blocks: [],
    usage: null,
    error: null,
    finish_reason: null,
  };
}

function done(run, frame) {
  const fields = { usage: frame.usage ?? null, finish_reason: frame.finish_reason ?? null };
  return ended(run, "done", fields);
}

function failed(run, frame) {
  const error = { message: frame.content ?? null, code: frame.code ?? null };
  return ended(run, "failed", { error });
}

function ended(run, status, fields = {}) {
  const blocks = run.blocks.map((b) => (b.done ? b : { ...b, done: true }));
  return { ...run, ...fields, status, blocks };
}

function indexOf(blocks, id) {
  if (typeof id !== "string") return null;
  for (let i = blocks.length - 1; i >= 0; i--) if (blocks[i].id === id) return i;
  return null;
}

function put(run, index, block) {
  const blocks = [...run.blocks];
  if (index === null) blocks.push(block);
  else blocks[index] = block;
  return { ...run, blocks };
}

function isRecord(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

// A snapshot's state is taken only when it has every part reducing reads, each of the
// type reducing needs, as shared/reducer.py checks; any other one changes nothing.

/** Whether `value` is a whole state: epoch, seq, runs, and order naming each run once. */
function isState(value) {
  if (!isRecord(value) || !Object.hasOwn(value, "epoch")) return false;
  const { epoch, seq, runs, order } = value;
  return (
    (epoch === null || typeof epoch === "string") &&
    Number.isSafeInteger(seq) &&
    isRecord(runs) &&
    Array.isArray(order) &&
    order.every((id) => typeof id === "string" && Object.hasOwn(runs, id)) &&
    new Set(order).size === order.length &&
    order.length === Object.keys(runs).length &&
    Object.values(runs).every(isRun)
  );
}

function isRun(run) {
  return (
    isRecord(run) &&
    typeof run.status === "string" &&
    Number.isSafeInteger(run.attempt) &&
    Array.isArray(run.blocks) &&
    run.blocks.every(isBlock)
  );
}

function isBlock(block) {
  if (
    !isRecord(block) ||
    typeof block.id !== "string" ||
    ![...KINDS.values()].includes(block.kind) ||
    typeof block.text !== "string" ||
    typeof block.done !== "boolean"
  ) {
    return false;
  }
  if (block.kind !== "tool_call") return true;
  const callId = Object.hasOwn(block, "call_id") ? block.call_id : 0; // absent: not a string, nor null
  return typeof block.input === "string" && (callId === null || typeof callId === "string");
}

const HANDLERS = new Map([
  ...[...KINDS.keys()].map((type) => [type, content]),
  ["block_end", blockEnd],
  ["approval", approval],
  ["decision", decision],
  ["retry", retry],
  ["done", done],
  ["error", failed],
  ["cancelled", (run) => ended(run, "cancelled")],
]);
