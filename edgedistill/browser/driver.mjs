// The browser harness's node side: serves files on localhost (cross-origin isolated, so that onnxruntime-web's WASM
// threads get SharedArrayBuffer), drives the system Chromium headless through playwright-core, and answers one JSON
// request per stdin line with one JSON line on stdout. Started by edgedistill/runtimes/ort_web.py; nothing here
// downloads anything: playwright-core and onnxruntime-web come from the project's `npm ci`.
//
// usage: node driver.mjs '{"nodeModules": DIR, "chromium": FILE, "assets": DIR}'
import { createRequire } from 'node:module';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import crypto from 'node:crypto';

const config = JSON.parse(process.argv[2]);
const require = createRequire(path.join(config.nodeModules, 'noop.js'));
const { chromium } = require('playwright-core');
const ortDist = path.join(config.nodeModules, 'onnxruntime-web', 'dist');

// Chromium's flags: no sandbox (root in a container), no GPU, nothing that reaches the network on its own
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage', '--disable-renderer-backgrounding', '--disable-background-timer-throttling'];
const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript',
  '.wasm': 'application/wasm', '.json': 'application/json', '.txt': 'text/plain; charset=utf-8',
  '.onnx': 'application/octet-stream', '.png': 'image/png', '.md': 'text/markdown; charset=utf-8' };

const mounts = new Map();  // URL prefix -> directory; '/__edgedistill/' = page assets, '/ort/' = onnxruntime-web
mounts.set('/__edgedistill/', config.assets);
mounts.set('/ort/', ortDist);
const files = new Map();  // '/m/<token>/<name>' -> one file (a model being validated)
const requested = [];  // URLs served, for the record (which onnxruntime-web files a page really fetched)

function resolveUrl(url) {
  const p = decodeURIComponent(new URL(url, 'http://x').pathname);
  if (files.has(p)) return files.get(p);
  for (const [prefix, dir] of mounts) {
    if (p.startsWith(prefix)) {
      const full = path.normalize(path.join(dir, p.slice(prefix.length) || 'index.html'));
      if (full.startsWith(path.normalize(dir))) return full;
    }
  }
  return null;
}

const server = http.createServer((req, res) => {
  const file = resolveUrl(req.url);
  requested.push(req.url);
  const headers = { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp',
    'Cross-Origin-Resource-Policy': 'same-origin', 'Cache-Control': 'no-store' };
  if (!file || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
    res.writeHead(404, headers); res.end('not found'); return;
  }
  headers['Content-Type'] = TYPES[path.extname(file)] || 'application/octet-stream';
  headers['Content-Length'] = fs.statSync(file).size;
  res.writeHead(200, headers);
  fs.createReadStream(file).pipe(res);
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const origin = `http://127.0.0.1:${server.address().port}`;

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgedistill-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: config.chromium, headless: true, args: ARGS, viewport: { width: 900, height: 640 },
    timeout: 60000 });
} catch (e) {
  process.stdout.write(JSON.stringify({ ready: false, error: String(e.message || e).split('\n')[0] }) + '\n');
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(3);
}
const browserVersion = context.browser() ? context.browser().version() : null;
const pages = new Map();
const consoleLines = new Map();

function token() { return crypto.randomBytes(8).toString('hex'); }

async function openPage(url) {
  const page = await context.newPage();
  const id = token();
  consoleLines.set(id, []);
  page.on('console', (m) => { const l = consoleLines.get(id); if (l.length < 200) l.push(`${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => consoleLines.get(id).push(`pageerror: ${e.message}`));
  pages.set(id, page);
  await page.goto(origin + url);
  return id;
}

async function evaluateIn(id, fn, arg) {
  const page = pages.get(id);
  if (!page) throw new Error(`no page ${id}`);
  return page.evaluate(fn, arg);
}

const ops = {
  // a harness page with onnxruntime-web loaded for one execution provider and thread count
  async open({ ep, threads }) {
    const id = await openPage(`/__edgedistill/harness.html?ep=${ep}&threads=${threads}`);
    await pages.get(id).waitForFunction(() => window.edgedistillReady !== undefined, null, { timeout: 60000 });
    const env = await evaluateIn(id, () => window.edgedistillReady);
    if (env.error) throw new Error(env.error);
    return { page: id, env, browser: browserVersion };
  },
  async load({ page, file, options }) {
    const url = `/m/${token()}/${path.basename(file)}`;
    files.set(url, file);
    return evaluateIn(page, ([u, o]) => window.edgedistill.load(u, o), [url, options || {}]);
  },
  async run({ page, session, feeds }) {
    return evaluateIn(page, ([s, f]) => window.edgedistill.run(s, f), [session, feeds]);
  },
  async upload({ page, key, feeds }) {
    return evaluateIn(page, ([k, f]) => window.edgedistill.upload(k, f), [key, feeds]);
  },
  async time({ page, session, keys, start, n, settle }) {
    return evaluateIn(page, (a) => window.edgedistill.time(a.session, a.keys, a.start, a.n, a.settle),
      { session, keys, start, n, settle });
  },
  async tokenize({ page, tokenizer, texts, maxLength }) {
    const url = `/m/${token()}/tokenizer.json`;
    files.set(url, tokenizer);
    return evaluateIn(page, (a) => window.edgedistill.tokenize(a.url, a.texts, a.maxLength),
      { url, texts, maxLength });
  },
  // the artifact's own index.html, served as a static folder: wait for its one run, screenshot it
  async demo({ dir, screenshot }) {
    const prefix = `/site/${token()}/`;
    mounts.set(prefix, dir);
    const id = await openPage(prefix + 'index.html');
    const page = pages.get(id);
    await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null, { timeout: 120000 });
    const result = await page.evaluate(() => ({ state: document.body.dataset.state, result: window.edgedistillDemo || null,
      text: document.body.innerText }));
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
    result.console = consoleLines.get(id);
    await this.close({ page: id });
    mounts.delete(prefix);
    return result;
  },
  async close({ page }) {
    const p = pages.get(page);
    if (p) { await p.close(); pages.delete(page); consoleLines.delete(page); }
    return {};
  },
  async served() { return { urls: requested.slice(-200) }; },
  async console({ page }) { return { lines: consoleLines.get(page) || [] }; },
};

async function quit() {
  try { await context.close(); } catch (e) { /* already gone */ }
  server.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(0);
}
process.stdin.on('end', quit);
process.on('SIGTERM', quit);

process.stdout.write(JSON.stringify({ ready: true, origin, browser: browserVersion }) + '\n');
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
let chain = Promise.resolve();
rl.on('line', (line) => {
  chain = chain.then(async () => {
    const req = JSON.parse(line);
    if (req.op === 'quit') return quit();
    let reply;
    try {
      reply = { id: req.id, ok: true, result: await ops[req.op](req) };
    } catch (e) {
      const lines = req.page ? (consoleLines.get(req.page) || []).slice(-5) : [];
      reply = { id: req.id, ok: false, error: String(e.message || e).split('\n').slice(0, 3).join(' '), console: lines };
    }
    process.stdout.write(JSON.stringify(reply) + '\n');
  });
});
