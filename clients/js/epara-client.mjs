// Client for the epara local socket API (protocol version 1), Node.js 20, no dependencies.
// Written from docs/local-api.md only.
//
//   import { EparaClient } from './epara-client.mjs';
//   const c = await new EparaClient().connect('/tmp/epara-1000/node.sock');
//   const out = await c.infer('add', { x: { dtype: 'float32', shape: [1, 4], data: new Float32Array(4) } });
//   for await (const ev of c.generate('llm', { prompt: 'Hi', params: { max_tokens: 8 } })) ...
//   c.close();

import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

// ---------------------------------------------------------------------------
// Errors

export class EparaError extends Error {
  /**
   * @param {string} code  protocol error code (section 6), or a client-side code:
   *                       `connection_closed`, `timeout`, `protocol_error`.
   * @param {string} message
   * @param {object} [reply] the full reply map, if any
   */
  constructor(code, message, reply = undefined) {
    super(message);
    this.name = 'EparaError';
    this.code = code;
    this.reply = reply;
  }
}

// ---------------------------------------------------------------------------
// Tensors (section 3)

// dtype -> [little-endian tag, big-endian tag, element bytes, TypedArray constructor]
// float16 has no TypedArray in Node 20: its data is a Uint16Array of raw IEEE half bits.
export const DTYPES = {
  uint8:   [64, 64, 1, Uint8Array],
  int8:    [72, 72, 1, Int8Array],
  uint16:  [69, 65, 2, Uint16Array],
  int16:   [77, 73, 2, Int16Array],
  uint32:  [70, 66, 4, Uint32Array],
  int32:   [78, 74, 4, Int32Array],
  uint64:  [71, 67, 8, BigUint64Array],
  int64:   [79, 75, 8, BigInt64Array],
  float16: [84, 80, 2, Uint16Array],
  float32: [85, 81, 4, Float32Array],
  float64: [86, 82, 8, Float64Array],
};

// tag -> [dtype, littleEndian]
const TAG_TO_DTYPE = new Map();
for (const [dt, [le, be]] of Object.entries(DTYPES)) {
  TAG_TO_DTYPE.set(le, [dt, true]);
  if (be !== le) TAG_TO_DTYPE.set(be, [dt, false]);
}
TAG_TO_DTYPE.set(68, ['uint8', true]); // uint8 "clamped"

const NATIVE_LE = os.endianness() === 'LE';

/** A tensor: `{dtype, shape, data}`. `littleEndian: false` sends the big-endian tag. */
export class Tensor {
  constructor(dtype, shape, data, { littleEndian = true } = {}) {
    if (dtype === 'bool') dtype = 'uint8'; // section 3: bool inputs take uint8 0/1
    if (!(dtype in DTYPES)) throw new TypeError(`unknown dtype ${dtype}`);
    this.dtype = dtype;
    this.shape = shape.map(Number);
    this.data = data;
    this.littleEndian = littleEndian;
  }
  static from(t) {
    if (t instanceof Tensor) return t;
    const dtype = t.dtype;
    let data = t.data;
    const [, , , Ctor] = DTYPES[dtype === 'bool' ? 'uint8' : dtype] || [];
    if (!Ctor) throw new TypeError(`unknown dtype ${dtype}`);
    if (Array.isArray(data)) {
      data = Ctor === BigInt64Array || Ctor === BigUint64Array
        ? Ctor.from(data, (v) => BigInt(v)) : Ctor.from(data);
    }
    const shape = t.shape ?? [data.length];
    return new Tensor(dtype, shape, data, { littleEndian: t.littleEndian ?? (t.endian ? t.endian !== 'big' : true) });
  }
  get size() { return this.shape.reduce((a, b) => a * b, 1); }
  toJSON() { return { dtype: this.dtype, shape: this.shape, data: Array.from(this.data, (v) => (typeof v === 'bigint' ? v.toString() : v)) }; }
}

function tensorBytes(t) {
  const [, , esize, Ctor] = DTYPES[t.dtype];
  let data = t.data;
  if (!ArrayBuffer.isView(data)) throw new TypeError('tensor data must be a TypedArray');
  if (!(data instanceof Ctor)) {
    // Accept raw bytes (Uint8Array/Buffer) of the right length, else convert element-wise.
    if (data instanceof Uint8Array && Ctor !== Uint8Array && data.length === t.size * esize) {
      return Buffer.from(data.buffer, data.byteOffset, data.byteLength); // already in the wire byte order
    }
    data = Ctor === BigInt64Array || Ctor === BigUint64Array
      ? Ctor.from(data, (v) => BigInt(v)) : Ctor.from(data);
  }
  if (data.length !== t.size) throw new TypeError(`tensor has ${data.length} elements, shape ${JSON.stringify(t.shape)} needs ${t.size}`);
  const buf = Buffer.from(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)); // copy
  if (esize > 1 && t.littleEndian !== NATIVE_LE) swapInPlace(buf, esize);
  return buf;
}

function swapInPlace(buf, esize) {
  if (esize === 2) buf.swap16();
  else if (esize === 4) buf.swap32();
  else if (esize === 8) buf.swap64();
}

function bytesToTypedArray(dtype, littleEndian, bytes) {
  const [, , esize, Ctor] = DTYPES[dtype];
  if (bytes.length % esize !== 0) throw new EparaError('protocol_error', `typed array of ${bytes.length} bytes is not a whole number of ${dtype}`);
  const copy = Buffer.alloc(bytes.length); // fresh, aligned
  bytes.copy(copy);
  if (esize > 1 && littleEndian !== NATIVE_LE) swapInPlace(copy, esize);
  return new Ctor(copy.buffer, copy.byteOffset, bytes.length / esize);
}

// ---------------------------------------------------------------------------
// CBOR (RFC 8949) subset

/** Wrap a number to force encoding as a CBOR float (double). */
export class CborFloat { constructor(v) { this.value = Number(v); } }
/** A CBOR tag not otherwise understood (decode side only). */
export class CborTag { constructor(tag, value) { this.tag = tag; this.value = value; } }

function head(major, n) {
  // n: number or bigint, non-negative
  const m = major << 5;
  if (typeof n === 'number' && n < 24) return Buffer.from([m | n]);
  if (typeof n === 'number' && n < 0x100) return Buffer.from([m | 24, n]);
  if (typeof n === 'number' && n < 0x10000) { const b = Buffer.alloc(3); b[0] = m | 25; b.writeUInt16BE(n, 1); return b; }
  if (typeof n === 'number' && n < 0x100000000) { const b = Buffer.alloc(5); b[0] = m | 26; b.writeUInt32BE(n, 1); return b; }
  const b = Buffer.alloc(9); b[0] = m | 27; b.writeBigUInt64BE(BigInt(n), 1); return b;
}

export function cborEncode(value) {
  const parts = [];
  enc(value, parts);
  return Buffer.concat(parts);
}

function encInt(v, parts) {
  if (typeof v === 'bigint') {
    if (v >= 0n) { if (v > 0xffffffffffffffffn) throw new RangeError('integer too large for CBOR'); parts.push(head(0, v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v)); }
    else { const n = -1n - v; if (n > 0xffffffffffffffffn) throw new RangeError('integer too small for CBOR'); parts.push(head(1, n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n)); }
    return;
  }
  if (v >= 0) parts.push(head(0, v > 0xffffffff ? BigInt(v) : v));
  else { const n = -1 - v; parts.push(head(1, n > 0xffffffff ? BigInt(n) : n)); }
}

function encFloat(v, parts) {
  const b = Buffer.alloc(9); b[0] = 0xfb; b.writeDoubleBE(v, 1); parts.push(b);
}

function enc(v, parts) {
  if (v === null || v === undefined) { parts.push(Buffer.from([0xf6])); return; }
  switch (typeof v) {
    case 'boolean': parts.push(Buffer.from([v ? 0xf5 : 0xf4])); return;
    case 'bigint': encInt(v, parts); return;
    case 'number':
      if (Number.isSafeInteger(v) && !Object.is(v, -0)) encInt(v, parts); else encFloat(v, parts);
      return;
    case 'string': { const b = Buffer.from(v, 'utf8'); parts.push(head(3, b.length), b); return; }
    default: break;
  }
  if (v instanceof CborFloat) { encFloat(v.value, parts); return; }
  if (v instanceof Tensor) {
    const [le, be] = DTYPES[v.dtype];
    const bytes = tensorBytes(v);
    parts.push(head(6, 40), head(4, 2), head(4, v.shape.length));
    for (const d of v.shape) encInt(d, parts);
    parts.push(head(6, v.littleEndian ? le : be), head(2, bytes.length), bytes);
    return;
  }
  if (v instanceof Uint8Array) { parts.push(head(2, v.length), Buffer.from(v.buffer, v.byteOffset, v.byteLength)); return; }
  if (Array.isArray(v)) { parts.push(head(4, v.length)); for (const x of v) enc(x, parts); return; }
  if (v instanceof Map) {
    parts.push(head(5, v.size));
    for (const [k, x] of v) { enc(k, parts); enc(x, parts); }
    return;
  }
  if (typeof v === 'object') {
    const entries = Object.entries(v).filter(([, x]) => x !== undefined);
    parts.push(head(5, entries.length));
    for (const [k, x] of entries) { enc(k, parts); enc(x, parts); }
    return;
  }
  throw new TypeError(`cannot CBOR-encode ${typeof v}`);
}

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

/** Decode one CBOR data item that must fill `buf` exactly. Maps decode to plain objects
 *  when all keys are text, else to `Map`. Tag 40 and typed-array tags decode to Tensor. */
export function cborDecode(buf) {
  const st = { buf, pos: 0, depth: 0 };
  const v = dec(st);
  if (st.pos !== buf.length) throw new EparaError('protocol_error', `${buf.length - st.pos} trailing bytes after CBOR item`);
  return v;
}

const BREAK = Symbol('break');

function need(st, n) {
  if (st.pos + n > st.buf.length) throw new EparaError('protocol_error', 'truncated CBOR');
}

function readArg(st, ai) {
  if (ai < 24) return ai;
  if (ai === 24) { need(st, 1); return st.buf[st.pos++]; }
  if (ai === 25) { need(st, 2); const v = st.buf.readUInt16BE(st.pos); st.pos += 2; return v; }
  if (ai === 26) { need(st, 4); const v = st.buf.readUInt32BE(st.pos); st.pos += 4; return v; }
  if (ai === 27) {
    need(st, 8); const v = st.buf.readBigUInt64BE(st.pos); st.pos += 8;
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  if (ai === 31) return -1; // indefinite
  throw new EparaError('protocol_error', `reserved CBOR additional info ${ai}`);
}

function dec(st) {
  if (++st.depth > 64) throw new EparaError('protocol_error', 'CBOR nested too deeply');
  try { return dec1(st); } finally { st.depth--; }
}

function dec1(st) {
  need(st, 1);
  const ib = st.buf[st.pos++];
  const major = ib >> 5;
  const ai = ib & 0x1f;
  if (ib === 0xff) return BREAK;
  switch (major) {
    case 0: { const n = readArg(st, ai); if (n === -1) throw new EparaError('protocol_error', 'bad CBOR int'); return n; }
    case 1: {
      const n = readArg(st, ai); if (n === -1) throw new EparaError('protocol_error', 'bad CBOR int');
      if (typeof n === 'bigint') { const r = -1n - n; return r >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(r) : r; }
      const r = -1 - n; return Number.isSafeInteger(r) ? r : -1n - BigInt(n);
    }
    case 2: case 3: {
      const n = readArg(st, ai);
      let bytes;
      if (n === -1) {
        const chunks = [];
        for (;;) { const c = dec(st); if (c === BREAK) break; chunks.push(major === 2 ? c : Buffer.from(c, 'utf8')); }
        bytes = Buffer.concat(chunks);
      } else {
        if (typeof n === 'bigint') throw new EparaError('protocol_error', 'string too long');
        need(st, n); bytes = st.buf.subarray(st.pos, st.pos + n); st.pos += n;
      }
      return major === 2 ? bytes : bytes.toString('utf8');
    }
    case 4: {
      const n = readArg(st, ai); const out = [];
      if (n === -1) { for (;;) { const x = dec(st); if (x === BREAK) break; out.push(x); } }
      else for (let i = 0; i < n; i++) out.push(decNoBreak(st));
      return out;
    }
    case 5: {
      const n = readArg(st, ai); const pairs = [];
      if (n === -1) { for (;;) { const k = dec(st); if (k === BREAK) break; pairs.push([k, decNoBreak(st)]); } }
      else for (let i = 0; i < n; i++) { const k = decNoBreak(st); pairs.push([k, decNoBreak(st)]); }
      if (pairs.every(([k]) => typeof k === 'string')) {
        const o = {};
        for (const [k, x] of pairs) Object.defineProperty(o, k, { value: x, enumerable: true, writable: true, configurable: true });
        return o;
      }
      return new Map(pairs);
    }
    case 6: {
      const tag = readArg(st, ai);
      const inner = decNoBreak(st);
      return decodeTag(tag, inner);
    }
    case 7: {
      if (ai === 20) return false;
      if (ai === 21) return true;
      if (ai === 22) return null;
      if (ai === 23) return undefined;
      if (ai === 25) { need(st, 2); const v = halfToFloat(st.buf.readUInt16BE(st.pos)); st.pos += 2; return v; }
      if (ai === 26) { need(st, 4); const v = st.buf.readFloatBE(st.pos); st.pos += 4; return v; }
      if (ai === 27) { need(st, 8); const v = st.buf.readDoubleBE(st.pos); st.pos += 8; return v; }
      if (ai < 24) return new CborTag(-1, ai); // unassigned simple value
      if (ai === 24) { need(st, 1); return new CborTag(-1, st.buf[st.pos++]); }
      throw new EparaError('protocol_error', `bad CBOR simple value ${ai}`);
    }
    default: throw new EparaError('protocol_error', 'bad CBOR major type');
  }
}

function decNoBreak(st) {
  const v = dec(st);
  if (v === BREAK) throw new EparaError('protocol_error', 'unexpected CBOR break');
  return v;
}

function decodeTag(tag, inner) {
  if (tag === 40) {
    if (!Array.isArray(inner) || inner.length !== 2 || !Array.isArray(inner[0])) throw new EparaError('protocol_error', 'malformed tag-40 tensor');
    const [shape, arr] = inner;
    if (!(arr instanceof Tensor)) throw new EparaError('protocol_error', 'tag-40 tensor without a typed array');
    const dims = shape.map(Number);
    const size = dims.reduce((a, b) => a * b, 1);
    if (arr.data.length !== size) throw new EparaError('protocol_error', `tensor with ${arr.data.length} elements for shape ${JSON.stringify(dims)}`);
    arr.shape = dims;
    return arr;
  }
  if (typeof tag === 'number' && TAG_TO_DTYPE.has(tag)) {
    if (!Buffer.isBuffer(inner)) throw new EparaError('protocol_error', `typed-array tag ${tag} around a non-byte-string`);
    const [dtype, le] = TAG_TO_DTYPE.get(tag);
    const data = bytesToTypedArray(dtype, le, inner);
    return new Tensor(dtype, [data.length], data); // decoded data is in native order
  }
  return new CborTag(tag, inner);
}

// ---------------------------------------------------------------------------
// Client

export function defaultSocketPath() {
  if (process.env.EPARA_SOCKET) return process.env.EPARA_SOCKET;
  if (process.env.XDG_RUNTIME_DIR) return path.join(process.env.XDG_RUNTIME_DIR, 'epara', 'node.sock');
  return `/tmp/epara-${process.getuid()}/node.sock`;
}

function replyError(reply) {
  const e = reply.error && typeof reply.error === 'object' ? reply.error : {};
  return new EparaError(String(e.code ?? 'unknown'), String(e.message ?? ''), reply);
}

export class EparaClient {
  /**
   * @param {object} [opts]
   * @param {number} [opts.timeoutMs] client-side timeout for every request (default none);
   *   per-call `timeoutMs` overrides it. With `deadlineMs` and no timeout, the client waits
   *   `deadlineMs + 5000` ms.
   */
  constructor({ timeoutMs = 0 } = {}) {
    this.timeoutMs = timeoutMs;
    this.sock = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {onReply(reply), onClose(err)}
    this.nullWaiters = [];    // FIFO of resolvers for replies with id null
    this.unmatched = [];      // replies nobody waited for (id null with no waiter, unknown id)
    this.rx = Buffer.alloc(0);
    this.closed = false;
  }

  /** Connect; resolves to `this`. */
  connect(socketPath = defaultSocketPath()) {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path: socketPath });
      const onErr = (e) => { reject(new EparaError('connection_closed', `cannot connect to ${socketPath}: ${e.message}`)); };
      sock.once('error', onErr);
      sock.once('connect', () => {
        sock.off('error', onErr);
        this.sock = sock;
        sock.on('data', (d) => this._onData(d));
        sock.on('error', (e) => this._onClose(e));
        sock.on('close', () => this._onClose());
        resolve(this);
      });
    });
  }

  close() {
    if (this.sock) this.sock.end();
    this._onClose();
  }

  _onClose(err) {
    if (this.closed) return;
    this.closed = true;
    const e = new EparaError('connection_closed', err ? `connection error: ${err.message}` : 'connection closed');
    for (const p of this.pending.values()) p.onClose(e);
    this.pending.clear();
    for (const w of this.nullWaiters) w.reject(e);
    this.nullWaiters = [];
    if (this.sock && !this.sock.destroyed) this.sock.destroy();
  }

  _onData(chunk) {
    this.rx = this.rx.length ? Buffer.concat([this.rx, chunk]) : chunk;
    while (this.rx.length >= 4) {
      const len = this.rx.readUInt32BE(0);
      if (this.rx.length < 4 + len) break;
      const payload = this.rx.subarray(4, 4 + len);
      this.rx = this.rx.subarray(4 + len);
      let reply;
      try {
        reply = cborDecode(payload);
      } catch (e) {
        this._onClose(new Error(`undecodable reply from node: ${e.message}`));
        return;
      }
      this._dispatch(reply);
    }
  }

  _dispatch(reply) {
    if (!reply || typeof reply !== 'object' || reply instanceof Map) { this.unmatched.push(reply); return; }
    const id = reply.id;
    if (id === null || id === undefined) {
      const w = this.nullWaiters.shift();
      if (w) w.resolve(reply); else this.unmatched.push(reply);
      return;
    }
    const p = this.pending.get(id);
    if (p) p.onReply(reply); else this.unmatched.push(reply);
  }

  _write(payloadBuf) {
    if (this.closed || !this.sock) throw new EparaError('connection_closed', 'not connected');
    const hdr = Buffer.alloc(4);
    hdr.writeUInt32BE(payloadBuf.length, 0);
    this.sock.write(Buffer.concat([hdr, payloadBuf]));
  }

  _timeoutFor(opts) {
    if (opts.timeoutMs) return opts.timeoutMs;
    if (this.timeoutMs) return this.timeoutMs;
    if (opts.deadlineMs) return opts.deadlineMs + 5000;
    return 0;
  }

  /** Send one request map, resolve to the (first and only) ok reply, reject with EparaError. */
  request(op, fields = {}, opts = {}) {
    const id = this.nextId++;
    const msg = { v: 1, id, op, ...fields };
    if (opts.deadlineMs !== undefined) msg.deadline_ms = opts.deadlineMs;
    return new Promise((resolve, reject) => {
      let timer = null;
      const done = () => { this.pending.delete(id); if (timer) clearTimeout(timer); };
      this.pending.set(id, {
        onReply: (r) => { done(); if (r.ok === true) resolve(r); else reject(replyError(r)); },
        onClose: (e) => { done(); reject(e); },
      });
      const t = this._timeoutFor(opts);
      if (t) timer = setTimeout(() => { done(); reject(new EparaError('timeout', `no reply to ${op} (id ${id}) within ${t} ms`)); }, t);
      try { this._write(cborEncode(msg)); } catch (e) { done(); reject(e); }
    });
  }

  /** Send a raw frame payload (no CBOR encoding) and resolve to its reply: the reply with
   *  `expectId` when given (the node echoes the id of a map it could read that far),
   *  else the next reply with id null. Meant for testing the node's frame handling. */
  sendRawFrame(payload, { timeoutMs = 10000, expectId } = {}) {
    if (expectId !== undefined) {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => { this.pending.delete(expectId); reject(new EparaError('timeout', `no reply to raw frame within ${timeoutMs} ms`)); }, timeoutMs);
        const done = () => { this.pending.delete(expectId); clearTimeout(timer); };
        this.pending.set(expectId, { onReply: (r) => { done(); resolve(r); }, onClose: (e) => { done(); reject(e); } });
        try { this._write(Buffer.from(payload)); } catch (e) { done(); reject(e); }
      });
    }
    return new Promise((resolve, reject) => {
      const w = { resolve: (r) => { clearTimeout(timer); resolve(r); }, reject: (e) => { clearTimeout(timer); reject(e); } };
      const timer = setTimeout(() => {
        const i = this.nullWaiters.indexOf(w); if (i >= 0) this.nullWaiters.splice(i, 1);
        reject(new EparaError('timeout', `no reply to raw frame within ${timeoutMs} ms`));
      }, timeoutMs);
      this.nullWaiters.push(w);
      try { this._write(Buffer.from(payload)); } catch (e) { w.reject(e); }
    });
  }

  async ping(opts = {}) { await this.request('ping', {}, opts); return true; }

  async models(opts = {}) { return (await this.request('models', {}, opts)).models; }

  async status(opts = {}) { return (await this.request('status', {}, opts)).status; }

  /**
   * @param {string} model
   * @param {Object<string,{dtype:string, shape:number[], data:TypedArray, littleEndian?:boolean}>} inputs
   * @param {{deadlineMs?:number, timeoutMs?:number}} [opts]
   * @returns {Promise<{outputs: Object<string,Tensor>, timing: object}>} outputs are `{dtype, shape, data}`
   *   (Tensor); `.outputs` and `.timing` of the reply. Use `(await c.infer(...)).outputs.y`.
   */
  async infer(model, inputs, opts = {}) {
    const enc = {};
    for (const [k, t] of Object.entries(inputs)) enc[k] = Tensor.from(t);
    const r = await this.request('infer', { model, inputs: enc }, opts);
    return { outputs: r.outputs, timing: r.timing };
  }

  /**
   * Stream a text generation. Async iterator of events:
   *   `{event: 'token', token, text}` ... then `{event: 'done', finish_reason, usage}`.
   * An error reply is thrown as EparaError from the iterator. Breaking out of the loop
   * early does not stop the generation on the node (the protocol has no cancel op other
   * than closing the connection); the remaining events are discarded.
   */
  generate(model, { prompt, messages, params } = {}, opts = {}) {
    const id = this.nextId++;
    const msg = { v: 1, id, op: 'generate', model };
    if (prompt !== undefined) msg.prompt = prompt;
    if (messages !== undefined) msg.messages = messages;
    if (params !== undefined) msg.params = params;
    if (opts.deadlineMs !== undefined) msg.deadline_ms = opts.deadlineMs;
    const queue = [];
    let wake = null;
    let finished = false;
    const push = (item) => { queue.push(item); if (wake) { const w = wake; wake = null; w(); } };
    let timer = null;
    const finish = () => { finished = true; this.pending.delete(id); if (timer) clearTimeout(timer); };
    this.pending.set(id, {
      onReply: (r) => {
        if (r.ok !== true) { finish(); push({ error: replyError(r) }); return; }
        if (r.event === 'done') { finish(); push({ value: r, last: true }); return; }
        push({ value: r });
      },
      onClose: (e) => { finish(); push({ error: e }); },
    });
    const t = this._timeoutFor(opts);
    if (t) timer = setTimeout(() => { finish(); push({ error: new EparaError('timeout', `generation (id ${id}) not done within ${t} ms`) }); }, t);
    try { this._write(cborEncode(msg)); } catch (e) { finish(); push({ error: e }); }
    const self = this;
    let ended = false;
    return {
      [Symbol.asyncIterator]() { return this; },
      async next() {
        if (ended) return { done: true, value: undefined };
        while (!queue.length) await new Promise((r) => { wake = r; });
        const item = queue.shift();
        if (item.error) { ended = true; throw item.error; }
        if (item.last) ended = true;
        const { v, id: _id, ok, ...ev } = item.value;
        return { done: false, value: ev };
      },
      async return() {
        ended = true;
        if (!finished) {
          // keep swallowing this id's replies so they do not land in `unmatched`
          self.pending.set(id, { onReply: (r) => { if (r.ok !== true || r.event === 'done') finish(); }, onClose: finish });
        }
        return { done: true, value: undefined };
      },
    };
  }
}
