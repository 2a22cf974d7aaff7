// The in-page side of the browser runtime, used both by the benchmark harness (harness.html, driven from Python)
// and by an artifact's demo page: create an onnxruntime-web session, run it on base64-encoded tensors, time calls
// with performance.now() inside the page (the page round-trip is not part of a model's latency).
import { WordPieceTokenizer } from './wordpiece.js';

const ARRAYS = { int64: BigInt64Array, int32: Int32Array, float32: Float32Array };

export function b64ToBytes(b64) {
  const s = atob(b64);
  const u = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
  return u;
}

export function bytesToB64(u8) {
  let s = '';
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
  return btoa(s);
}

// the session options every edgedistill page uses: all graph optimizations, no busy-waiting between runs (as the
// native sessions: a spinning pool would steal the cores from whatever is timed next)
export function sessionOptions(ep) {
  return { executionProviders: [ep], graphOptimizationLevel: 'all',
    extra: { session: { intra_op: { allow_spinning: '0' } } } };
}

export function makeHarness(ort) {
  const sessions = new Map();
  const uploaded = new Map();
  let next = 0;

  function tensors(session, feeds) {
    const out = {};
    for (const name of session.inputNames) {
      const f = feeds[name];
      if (!f) throw new Error(`input ${name} missing`);
      const bytes = b64ToBytes(f.b64);
      out[name] = new ort.Tensor(f.type, new ARRAYS[f.type](bytes.buffer), f.dims);
    }
    return out;
  }

  function encode(t) {
    const d = t.data;
    return { dims: t.dims, type: t.type, b64: bytesToB64(new Uint8Array(d.buffer, d.byteOffset, d.byteLength)) };
  }

  return {
    async load(url, options) {
      const session = await ort.InferenceSession.create(url, sessionOptions(options.ep || 'wasm'));
      const id = `s${next++}`;
      sessions.set(id, session);
      return { session: id, inputNames: session.inputNames, outputNames: session.outputNames,
        numThreads: ort.env.wasm.numThreads };
    },
    async run(id, feeds) {
      const session = sessions.get(id);
      const out = await session.run(tensors(session, feeds));
      return encode(out[session.outputNames[0]]);
    },
    // inputs kept in the page for timing, so that timed calls move no data between Python and the page
    upload(key, feeds) {
      uploaded.set(key, feeds);
      return {};
    },
    // `settle` untimed calls, then `n` timed calls, both on the uploaded inputs in rotation from `start`: ms per call
    async time(id, keys, start, n, settle) {
      const session = sessions.get(id);
      const inputs = keys.map((k) => tensors(session, uploaded.get(k)));
      for (let j = 0; j < settle; j++) await session.run(inputs[(start + j) % inputs.length]);
      const samples = [];
      for (let j = 0; j < n; j++) {
        const feeds = inputs[(start + j) % inputs.length];
        const t0 = performance.now();
        await session.run(feeds);
        samples.push(performance.now() - t0);
      }
      return samples;
    },
    async tokenize(url, texts, maxLength) {
      const tok = await WordPieceTokenizer.fromUrl(url);
      return texts.map((t) => tok.encode(t, maxLength).input_ids);
    },
  };
}
