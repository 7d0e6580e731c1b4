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
/** Prompts and cancellations held while no socket is open; more are refused. */
const MAX_PENDING = 64;
/** A socket its frontend kept this long (ms) had a token that worked: its 4001 is an expiry. */
const TOKEN_LASTED_MS = 10000;

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
 * - `event`: every event of the session (it has `seq`), exactly once, in seq order.
 * - `gap`: a gap reply: events after `after` are lost; the stream goes on at `next`
 *   of `epoch`.
 * - `message`: every other frame from the server (`session`, `error`, `ping`, ...).
 * - `error`: `{action, code?, reason}`: something the client was asked to do failed
 *   (a prompt or cancel refused, a token callback that threw); the client goes on.
 */
export class Thoughtwire extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string | string[]} [options.urls] frontends to try in turn; default: this page's origin
   * @param {string} [options.path] the socket path appended to base URLs
   * @param {string | (() => string | Promise<string>)} [options.token] a token, or a
   *   callback that returns a fresh one, called on every connect
   * @param {string} [options.session] continue or follow this session; default: a new one
   * @param {number} [options.after] start after this seq (with `session`); default: from now on
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
    this._index = 0;
    this._pending = [];
    this._timer = null;
    this._beat = null;
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
   * @param {{key?: string}} [options] an idempotency key: the same key runs once
   */
  prompt(text, { key } = {}) {
    const frame = { type: "prompt", content: String(text) };
    if (key !== undefined && key !== null) frame.key = key;
    this._write("prompt", frame);
  }

  /**
   * Cancel a run of the session, or without `run` every unfinished one.
   *
   * @param {string} [run]
   */
  cancel(run) {
    this._write("cancel", run ? { type: "cancel", run } : { type: "cancel" });
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
    reason ||= code === 1006 ? "the connection failed or was lost" : "";
    const { _admitted: admitted, _wrote: wrote } = this;
    if (admitted && (code !== UNAUTHORIZED || Date.now() - this._admittedAt >= TOKEN_LASTED_MS)) {
      // The last fresh token worked: a later 4001 may have another. A 4001 just after
      // the door opened means the callback's tokens do not work, and is final.
      this._authRetried = false;
    }
    if (code === FORBIDDEN && admitted && wrote !== null) {
      // The token may read this session but not write to it (a viewer): the socket
      // was closed for the write alone, so the application hears of the refusal and
      // the client goes on following.
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
    // The next frontend in the list: the one that dropped the socket may be restarting.
    this._index = (this._index + 1) % this.urls.length;
    const ceiling = Math.min(this.backoff.max, this.backoff.initial * 2 ** (attempt - 1));
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
    this._pending = [];
    this._setState("closed", { code, reason });
    const error = new Error(`closed (${code}): ${reason}`);
    Object.assign(error, { code, reason });
    this._reject?.(error); // a no-op once connect() has resolved
  }

  // --- receiving ------------------------------------------------------------

  _receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // this endpoint sends JSON only
    }
    if (typeof message?.seq === "number") {
      this._event(message);
    } else if (message?.type === "gap") {
      this._gap(message);
    } else {
      if (message?.type === "session") this._welcome(message);
      else if (message?.type === "ping") this._ws?.send(JSON.stringify({ type: "pong" }));
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
    this._failures = 0;
    this._admittedAt = Date.now();
    this._setState(this._resuming ? "resumed" : "connected", this._resuming ? { gap: null } : {});
    const pending = this._pending;
    this._pending = [];
    for (const [action, frame] of pending) this._send(action, frame);
    this._resolve?.(this);
  }

  _event(event) {
    this._firstFrame = false;
    if (this.seq !== null && event.epoch === this.epoch && event.seq <= this.seq) return;
    this.epoch = event.epoch;
    this.seq = event.seq;
    this._emit("event", event);
  }

  _gap(gap) {
    // The stream goes on at `next` of `epoch`: that is the position from now on. A null
    // epoch (the log is gone) is the start of no epoch: keeping the old one would have the
    // next resume name a position the frontend cannot confirm, and be told the loss again.
    if (typeof gap.epoch === "string" || gap.epoch === null) this.epoch = gap.epoch;
    if (Number.isInteger(gap.next)) this.seq = gap.next - 1;
    this._emit("gap", gap);
    if (this._firstFrame && this._resuming) this._setState("resumed", { gap });
    this._firstFrame = false;
  }

  // --- sending --------------------------------------------------------------

  _write(action, frame) {
    if (this._done) {
      this._emit("error", { action, reason: "the client is closed" });
    } else if (this._ws !== null && this._admitted) {
      this._send(action, frame);
    } else if (this._pending.length < MAX_PENDING) {
      this._pending.push([action, frame]);
    } else {
      this._emit("error", { action, reason: "too many messages wait for a connection" });
    }
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

function messageOf(err) {
  return err instanceof Error ? err.message : String(err);
}
