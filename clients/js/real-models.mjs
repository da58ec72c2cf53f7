// Checks the JS client (written from docs/local-api.md alone) against a node serving the
// real shipped models: selfie-seg (TFLite), text-det (ONNX), minilm (TorchScript) and,
// when served, smollm2-135m (generate). Usage: node real-models.mjs SOCKET
import { EparaClient } from './epara-client.mjs';

const client = await new EparaClient({ timeoutMs: 60000 }).connect(process.argv[2]);
let failed = 0;
async function check(name, fn) {
  try { console.log(`ok - ${name}: ${await fn()}`); }
  catch (e) { failed += 1; console.log(`not ok - ${name}: ${e.message}`); }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }

const served = new Set((await client.models()).map((m) => m.name));

await check('selfie-seg (TFLite) gives a [1,256,256,1] probability map', async () => {
  const n = 256 * 256 * 3;
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = (i % 97) / 97;
  const { outputs } = await client.infer('selfie-seg', { input_1: { dtype: 'float32', shape: [1, 256, 256, 3], data } });
  const out = Object.values(outputs)[0];
  assert(out.shape.join(',') === '1,256,256,1', `shape ${out.shape}`);
  const values = Array.from(out.data);
  assert(values.every((v) => v >= 0 && v <= 1), 'values outside [0, 1]');
  return `shape ${out.shape}`;
});

await check('text-det (ONNX) gives a probability map at the input size', async () => {
  const n = 3 * 64 * 96;
  const data = new Float32Array(n).fill(0.5);
  const { outputs } = await client.infer('text-det', { x: { dtype: 'float32', shape: [1, 3, 64, 96], data } });
  const out = Object.values(outputs)[0];
  assert(out.shape.join(',') === '1,1,64,96', `shape ${out.shape}`);
  return `shape ${out.shape}`;
});

await check('minilm (TorchScript) gives a unit-length 384-d embedding', async () => {
  const ids = BigInt64Array.from([101n, 7592n, 2088n, 102n]);
  const mask = BigInt64Array.from([1n, 1n, 1n, 1n]);
  const { outputs } = await client.infer('minilm', {
    input_ids: { dtype: 'int64', shape: [1, 4], data: ids },
    attention_mask: { dtype: 'int64', shape: [1, 4], data: mask },
  });
  const out = Object.values(outputs)[0];
  assert(out.shape.join(',') === '1,384', `shape ${out.shape}`);
  const norm = Math.sqrt(Array.from(out.data).reduce((s, v) => s + v * v, 0));
  assert(Math.abs(norm - 1) < 1e-3, `norm ${norm}`);
  return `norm ${norm.toFixed(4)}`;
});

if (served.has('smollm2-135m')) {
  await check('smollm2-135m streams "Paris"', async () => {
    let text = '';
    for await (const ev of client.generate('smollm2-135m', { prompt: 'The capital of France is', params: { max_tokens: 8 } })) {
      if (ev.event === 'token') text += ev.text;
    }
    assert(text.includes('Paris'), JSON.stringify(text));
    return JSON.stringify(text);
  });
}

client.close();
process.exit(failed ? 1 : 0);
