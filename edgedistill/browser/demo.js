// The artifact's demo: tokenize the text in JavaScript, run the model once with onnxruntime-web, show the output.
import { WordPieceTokenizer } from './wordpiece.js';
import { sessionOptions } from './runner.js';

const $ = (id) => document.getElementById(id);
const fmt = (ms) => `${ms.toFixed(1)} ms`;

async function main() {
  const cfg = await (await fetch('page.json')).json();
  let ep = cfg.executionProvider;
  let note = '';
  if (ep === 'webgpu' && !(navigator.gpu && await navigator.gpu.requestAdapter())) {
    ep = 'wasm';
    note = ' (no WebGPU adapter: on wasm)';
  }
  const ort = await import(cfg.executionProvider === 'webgpu' ? './ort.webgpu.min.mjs' : './ort.wasm.min.mjs');
  ort.env.wasm.wasmPaths = new URL('./', location.href).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? cfg.threads : 1;
  const [tok, session] = await Promise.all([WordPieceTokenizer.fromUrl('tokenizer.json'),
    ort.InferenceSession.create(cfg.model, sessionOptions(ep))]);
  const threads = ort.env.wasm.numThreads;
  $('title').textContent = `edgedistill · ${cfg.target}`;
  $('env').textContent = `onnxruntime-web ${ort.env.versions?.web ?? ''} · ${ep}${note} · ${threads} thread${threads > 1 ? 's' : ''}` +
    `${self.crossOriginIsolated ? '' : ' (page not cross-origin isolated)'} · ${cfg.task}`;
  $('text').value = cfg.text;

  async function run(text) {
    const enc = tok.encode(text, cfg.maxLength);
    const n = enc.input_ids.length;
    const feeds = {};
    for (const name of session.inputNames) {
      feeds[name] = new ort.Tensor('int64', BigInt64Array.from(enc[name].map(BigInt)), [1, n]);
    }
    let t0 = performance.now();
    const out = (await session.run(feeds))[session.outputNames[0]];
    const first = performance.now() - t0;
    const times = [];
    for (let i = 0; i < 10; i++) { t0 = performance.now(); await session.run(feeds); times.push(performance.now() - t0); }
    times.sort((a, b) => a - b);
    const values = Array.from(out.data);
    $('ntok').textContent = String(n);
    $('dims').textContent = out.dims.join(' × ');
    $('first').textContent = fmt(first);
    $('warm').textContent = fmt((times[4] + times[5]) / 2);
    $('ids').innerHTML = enc.input_ids.slice(0, 48).map((i) => `<span>${i}</span>`).join('') + (n > 48 ? ' …' : '');
    if (cfg.task === 'text-classification' && cfg.labels) {
      const best = values.indexOf(Math.max(...values));
      $('outk').textContent = `logits — predicted: ${cfg.labels[best]}`;
    } else {
      const norm = Math.sqrt(values.reduce((s, v) => s + v * v, 0));
      $('outk').textContent = `${session.outputNames[0]} — first 12 of ${values.length} values, L2 norm ${norm.toFixed(4)}`;
    }
    $('vec').textContent = values.slice(0, 12).map((v) => v.toFixed(5)).join('  ');
    window.edgedistillDemo = { text, input_ids: enc.input_ids, output: values, dims: out.dims, first_ms: first,
      median_ms: (times[4] + times[5]) / 2, ep, threads, crossOriginIsolated: self.crossOriginIsolated };
  }

  $('go').onclick = () => run($('text').value).catch(fail);
  $('go').disabled = false;
  await run(cfg.text);
  document.body.dataset.state = 'done';
}

function fail(e) {
  window.edgedistillDemo = { error: String(e && e.message || e) };
  $('env').innerHTML = `<span class="err">${String(e && e.message || e)}</span>`;
  document.body.dataset.state = 'error';
}

main().catch(fail);
