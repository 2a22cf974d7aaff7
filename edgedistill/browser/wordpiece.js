// A WordPiece tokenizer for the browser that reads a Hugging Face tokenizer.json (BertNormalizer, BertPreTokenizer,
// WordPiece, Template/BertProcessing) and gives the same ids as the Python `tokenizers` library: the page tokenizes
// in JavaScript what the artifact was validated on in Python. tests/test_browser.py checks the two agree in Chromium.

const CHINESE = [[0x4e00, 0x9fff], [0x3400, 0x4dbf], [0x20000, 0x2a6df], [0x2a700, 0x2b73f], [0x2b740, 0x2b81f],
  [0x2b920, 0x2ceaf], [0xf900, 0xfaff], [0x2f800, 0x2fa1f]];
const isChinese = (cp) => CHINESE.some(([a, b]) => cp >= a && cp <= b);
const isWhitespace = (c) => c === '\t' || c === '\n' || c === '\r' || /\p{White_Space}/u.test(c);
const isControl = (c) => c !== '\t' && c !== '\n' && c !== '\r' && /\p{C}/u.test(c);
const isPunct = (c) => /[!-/:-@[-`{-~]/.test(c) || /\p{P}/u.test(c);

export class WordPieceTokenizer {
  constructor(spec) {
    const model = spec.model || {};
    if (model.type !== 'WordPiece') throw new Error(`tokenizer.json model ${model.type}: this page reads WordPiece only`);
    this.vocab = new Map(Object.entries(model.vocab));
    this.unk = model.unk_token;
    this.prefix = model.continuing_subword_prefix ?? '##';
    this.maxChars = model.max_input_chars_per_word ?? 100;
    const norm = spec.normalizer;
    if (norm && norm.type !== 'BertNormalizer') throw new Error(`tokenizer.json normalizer ${norm.type} is not supported`);
    this.norm = norm || null;
    const pre = spec.pre_tokenizer;
    if (pre && pre.type !== 'BertPreTokenizer') throw new Error(`tokenizer.json pre_tokenizer ${pre.type} is not supported`);
    this.template = this.readTemplate(spec.post_processor);
    this.padId = spec.padding?.pad_id ?? this.vocab.get('[PAD]') ?? 0;
  }

  static async fromUrl(url) {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return new WordPieceTokenizer(await res.json());
  }

  readTemplate(post) {
    if (!post) return { before: [], after: [] };
    if (post.type === 'BertProcessing') return { before: [post.cls[1]], after: [post.sep[1]] };
    if (post.type !== 'TemplateProcessing') throw new Error(`tokenizer.json post_processor ${post.type} is not supported`);
    const before = [], after = [];
    let seen = false;
    for (const piece of post.single) {
      if (piece.Sequence) { seen = true; continue; }
      const ids = post.special_tokens[piece.SpecialToken.id].ids;
      (seen ? after : before).push(...ids);
    }
    return { before, after };
  }

  normalize(text) {
    const n = this.norm;
    if (!n) return text;
    let chars = Array.from(text);
    if (n.clean_text) {
      chars = chars.filter((c) => c !== '\u0000' && c !== '\ufffd' && !isControl(c)).map((c) => (isWhitespace(c) ? ' ' : c));
    }
    if (n.handle_chinese_chars) chars = chars.map((c) => (isChinese(c.codePointAt(0)) ? ` ${c} ` : c));
    let s = chars.join('');
    const strip = n.strip_accents ?? n.lowercase;
    if (strip) s = s.normalize('NFD').replace(/\p{Mn}/gu, '');
    if (n.lowercase) s = Array.from(s).map((c) => c.toLowerCase()).join('');
    return s;
  }

  preTokenize(text) {
    const words = [];
    let word = '';
    for (const c of text) {
      if (isWhitespace(c)) { if (word) words.push(word); word = ''; }
      else if (isPunct(c)) { if (word) words.push(word); words.push(c); word = ''; }
      else word += c;
    }
    if (word) words.push(word);
    return words;
  }

  wordPiece(word) {
    const chars = Array.from(word);
    if (chars.length > this.maxChars) return [this.vocab.get(this.unk)];
    const ids = [];
    let start = 0;
    while (start < chars.length) {
      let end = chars.length, id;
      while (start < end) {
        const piece = (start > 0 ? this.prefix : '') + chars.slice(start, end).join('');
        if (this.vocab.has(piece)) { id = this.vocab.get(piece); break; }
        end -= 1;
      }
      if (id === undefined) return [this.vocab.get(this.unk)];
      ids.push(id);
      start = end;
    }
    return ids;
  }

  // ids, attention mask and token type ids of one text, truncated to maxLength tokens (special tokens included)
  encode(text, maxLength = 512) {
    let ids = this.preTokenize(this.normalize(text)).flatMap((w) => this.wordPiece(w));
    const { before, after } = this.template;
    ids = ids.slice(0, Math.max(0, maxLength - before.length - after.length));
    ids = [...before, ...ids, ...after];
    return { input_ids: ids, attention_mask: ids.map(() => 1), token_type_ids: ids.map(() => 0) };
  }
}
