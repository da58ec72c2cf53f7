#!/usr/bin/env node
// Exercise an epara node through the local socket API.
//   node check.mjs /path/to/node.sock
// Prints one line per check (`ok - ...` / `not ok - ...`); exits 0 only if all pass.

import { EparaClient, EparaError, Tensor, cborEncode, cborDecode, defaultSocketPath } from './epara-client.mjs';

const socketPath = process.argv[2] || defaultSocketPath();
let failures = 0;
let n = 0;

async function check(name, fn) {
  n++;
  try {
    const detail = await fn();
    console.log(`ok - ${name}${detail ? ` (${detail})` : ''}`);
  } catch (e) {
    failures++;
    const why = e instanceof EparaError ? `${e.code}: ${e.message}` : (e && e.stack) || String(e);
    console.log(`not ok - ${name}: ${why}`);
  }
}

function assert(cond, msg) { if (!cond) throw new Error(msg); }

async function expectError(promise, code) {
  try {
    const r = await promise;
    throw new Error(`expected error ${code}, got success ${JSON.stringify(r, jsonSafe)}`);
  } catch (e) {
    if (!(e instanceof EparaError)) throw e;
    assert(e.code === code, `expected error ${code}, got ${e.code}: ${e.message}`);
    assert(typeof e.message === 'string', 'error message is not text');
    return `${e.code}: ${e.message}`;
  }
}

function jsonSafe(_k, v) {
  if (typeof v === 'bigint') return v.toString();
  if (ArrayBuffer.isView(v)) return Array.from(v);
  return v;
}

function plusOneExact(x, y, shape) {
  assert(y && y.dtype === 'float32', `output dtype ${y && y.dtype}, want float32`);
  assert(JSON.stringify(y.shape) === JSON.stringify(shape), `output shape ${JSON.stringify(y.shape)}, want ${JSON.stringify(shape)}`);
  assert(y.data instanceof Float32Array, 'output data is not a Float32Array');
  for (let i = 0; i < x.length; i++) {
    const want = Math.fround(x[i] + 1);
    assert(Object.is(y.data[i], want), `element ${i}: got ${y.data[i]}, want ${want}`);
  }
}

function toHex(b) { return Buffer.from(b).toString('hex'); }

// ---- offline self-checks of the codec against the document's examples ----

await check('codec: section 3 example tensor encodes byte-exactly', () => {
  const got = toHex(cborEncode(new Tensor('float32', [1, 2], new Float32Array([1, 2]))));
  const want = 'd828' + '82' + '820102' + 'd855' + '48' + '0000803f00000040';
  assert(got === want, `got ${got}, want ${want}`);
});

await check('codec: section 7 example request encodes byte-exactly', () => {
  const payload = cborEncode({ id: 1, op: 'infer', model: 'add', inputs: { x: new Tensor('float32', [1, 2], new Float32Array([1, 2])) } });
  const frame = Buffer.concat([Buffer.from([0, 0, 0, payload.length]), payload]);
  const want = ('00000033 a4 626964 01 626f70 65696e666572 656d6f64656c 63616464 66696e70757473 a1 6178'
    + ' d828 82 820102 d855 48 0000803f00000040').replace(/ /g, '');
  assert(toHex(frame) === want, `got ${toHex(frame)}, want ${want}`);
});

await check('codec: round trip of ints, 64-bit ints, floats, half floats, big-endian tensors', () => {
  const v = cborDecode(cborEncode({ a: -1, b: 2 ** 40, c: 2n ** 63n, d: -(2n ** 63n), e: 1.5, f: [true, false, null], g: 'é' }));
  assert(v.a === -1 && v.b === 2 ** 40 && v.c === 2n ** 63n && v.d === -(2n ** 63n) && v.e === 1.5, JSON.stringify(v, jsonSafe));
  assert(cborDecode(Buffer.from('f93e00', 'hex')) === 1.5, 'half float');
  assert(cborDecode(Buffer.from('fa3fc00000', 'hex')) === 1.5, 'single float');
  const be = new Tensor('float32', [2], new Float32Array([1, 2]), { littleEndian: false });
  const bytes = cborEncode(be);
  assert(toHex(bytes) === 'd828' + '82' + '8102' + 'd851' + '48' + '3f80000040000000', `BE encoding ${toHex(bytes)}`);
  const back = cborDecode(bytes);
  assert(back.dtype === 'float32' && back.data[0] === 1 && back.data[1] === 2, 'BE decode');
  const i64 = cborDecode(cborEncode(new Tensor('int64', [2], new BigInt64Array([-5n, 2n ** 62n]))));
  assert(i64.dtype === 'int64' && i64.data[0] === -5n && i64.data[1] === 2n ** 62n, 'int64 tensor');
});

// ---- against the node ----

const client = new EparaClient({ timeoutMs: 15000 });
try {
  await client.connect(socketPath);
} catch (e) {
  console.log(`not ok - connect to ${socketPath}: ${e.message}`);
  process.exit(1);
}

await check('ping', async () => {
  const r = await client.request('ping');
  assert(r.ok === true && r.v === 1 && r.id !== undefined, `reply ${JSON.stringify(r)}`);
});

let models = [];
await check('models lists add and stream', async () => {
  models = await client.models();
  assert(Array.isArray(models), 'models is not an array');
  const names = models.map((m) => m.name);
  for (const want of ['add', 'stream']) assert(names.includes(want), `no ${want} in ${JSON.stringify(names)}`);
  const desc = (m) => `${m.name}: ${m.inputs.map((i) => `${i.name}:${i.dtype}${JSON.stringify(i.shape)}`).join(',')} ${m.hints?.category ?? ''}`;
  return models.filter((m) => names.includes(m.name)).map(desc).join('; ');
});

await check('infer add with a 3x4 float32 input gives x+1 exactly', async () => {
  const x = Float32Array.from({ length: 12 }, (_, i) => i * 0.25 - 1.3);
  const r = await client.infer('add', { x: { dtype: 'float32', shape: [3, 4], data: x } });
  plusOneExact(x, r.outputs.y, [3, 4]);
  assert(typeof r.timing?.batch === 'number', `timing ${JSON.stringify(r.timing)}`);
  return `timing ${JSON.stringify(r.timing)}`;
});

await check('8 concurrent infers on stream, one connection, all correct', async () => {
  const xs = Array.from({ length: 8 }, (_, k) => Float32Array.from({ length: 4 }, (_, i) => k * 10 + i + 0.5));
  const rs = await Promise.all(xs.map((x) => client.infer('stream', { x: { dtype: 'float32', shape: [1, 4], data: x } })));
  rs.forEach((r, k) => plusOneExact(xs[k], r.outputs.y, [1, 4]));
  return `batch sizes ${rs.map((r) => r.timing?.batch).join(',')}`;
});

await check('unknown model gives unknown_model', () =>
  expectError(client.infer('no-such-model', { x: { dtype: 'float32', shape: [1, 4], data: new Float32Array(4) } }), 'unknown_model'));

await check('float64 input gives bad_input', () =>
  expectError(client.infer('add', { x: { dtype: 'float64', shape: [1, 4], data: new Float64Array(4) } }), 'bad_input'));

await check('big-endian float32 input is accepted', async () => {
  const x = new Float32Array([1.5, -2, 3.25, 1e6, 0, -0.5, 7, 8]);
  const r = await client.infer('add', { x: { dtype: 'float32', shape: [2, 4], data: x, littleEndian: false } });
  plusOneExact(x, r.outputs.y, [2, 4]);
});

await check('malformed frame gets bad_frame (id null) and the connection still works', async () => {
  const r = await client.sendRawFrame(Buffer.from([0xff, 0xfe, 0x00, 0x13, 0x37])); // a break code: not CBOR
  assert(r.ok === false && r.id === null && r.error?.code === 'bad_frame', `reply ${JSON.stringify(r)}`);
  await client.ping();
  return `${r.error.code}: ${r.error.message}`;
});

await check('status returns a map with node_id', async () => {
  const s = await client.status();
  assert(s && typeof s === 'object' && !Array.isArray(s), 'status is not a map');
  assert(s.node_id !== undefined && s.node_id !== null, `no node_id in ${Object.keys(s)}`);
  return `node_id ${s.node_id}`;
});

// ---- further behaviour promised by the document ----

await check('top-level CBOR that is not a map gets bad_frame, connection stays open', async () => {
  const r = await client.sendRawFrame(cborEncode([1, 2, 3]));
  assert(r.ok === false && r.id === null && r.error?.code === 'bad_frame', `reply ${JSON.stringify(r)}`);
  await client.ping();
});

await check('an unknown tag gets bad_frame', async () => {
  // {"id": "tagtest", "op": "ping", "x": tag 12345(0)}
  // Section 2: the reply carries the request's id when the map could be read that far.
  const id = 'tagtest';
  const payload = Buffer.concat([Buffer.from('a3', 'hex'), cborEncode('id'), cborEncode(id), cborEncode('op'), cborEncode('ping'), cborEncode('x'), Buffer.from('d9303900', 'hex')]);
  const r = await client.sendRawFrame(payload, { expectId: id });
  assert(r.ok === false && r.id === id && r.error?.code === 'bad_frame', `reply ${JSON.stringify(r)}`);
  await client.ping();
  return `${r.error.code}: ${r.error.message}`;
});

await check('unknown op gives unknown_op', () => expectError(client.request('frobnicate'), 'unknown_op'));

await check('missing model field gives bad_request', () => expectError(client.request('infer', { inputs: {} }), 'bad_request'));

await check('generate on a non-LLM gives unsupported', async () => {
  try {
    for await (const ev of client.generate('add', { prompt: 'hi' })) throw new Error(`unexpected event ${JSON.stringify(ev)}`);
    throw new Error('generation finished without error');
  } catch (e) {
    if (!(e instanceof EparaError)) throw e;
    assert(e.code === 'unsupported', `got ${e.code}: ${e.message}`);
    return `${e.code}: ${e.message}`;
  }
});

await check('deadline_ms 0 gives bad_request', () =>
  expectError(client.infer('add', { x: { dtype: 'float32', shape: [1, 4], data: new Float32Array(4) } }, { deadlineMs: 0 }), 'bad_request'));

await check('a generous deadline_ms is honoured', async () => {
  const x = new Float32Array([1, 2, 3, 4]);
  const r = await client.infer('add', { x: { dtype: 'float32', shape: [1, 4], data: x } }, { deadlineMs: 5000 });
  plusOneExact(x, r.outputs.y, [1, 4]);
});

await check('wrong rank gives bad_input', () =>
  expectError(client.infer('add', { x: { dtype: 'float32', shape: [4], data: new Float32Array(4) } }), 'bad_input'));

await check('no unmatched replies were received', () => {
  assert(client.unmatched.length === 0, `unmatched: ${JSON.stringify(client.unmatched, jsonSafe)}`);
});

client.close();

// A zero-length frame: bad_frame, then the node closes the connection.
await check('zero-length frame gets bad_frame and the node closes the connection', async () => {
  const c = await new EparaClient({ timeoutMs: 5000 }).connect(socketPath);
  const closed = new Promise((res) => c.sock.once('close', res));
  const r = await c.sendRawFrame(Buffer.alloc(0));
  assert(r.ok === false && r.error?.code === 'bad_frame', `reply ${JSON.stringify(r)}`);
  await Promise.race([closed, new Promise((_, rej) => setTimeout(() => rej(new Error('connection not closed')), 3000))]);
  c.close();
});

console.log(`# ${n - failures}/${n} checks passed`);
process.exit(failures ? 1 : 0);
