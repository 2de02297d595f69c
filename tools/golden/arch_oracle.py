#!/usr/bin/env python3
"""llama.cpp's answers for weave's synthetic architecture models (tests/tests/arch_oracle.rs).

1. A cut-down BPE vocabulary from SmolLM2's GGUF: its first tokens (special tokens, the 256
   byte characters, the earliest merges) and every merge whose parts and result survive.
   A SentencePiece vocabulary is made from it too (pieces scored by merge rank, byte tokens).
2. weave writes its synthetic models (weave::model::synth: Llama 3 with rope_freqs, Qwen2,
   Qwen3, Gemma 3; random weights from fixed seeds) with those vocabularies:
   `cargo run -p weave --release --example synth_models`.
3. llama.cpp's llama-server, on each file (f32 KV cache, one slot):
   - /tokenize on a corpus of 200+ strings, for each tokenizer (llama-bpe, qwen2, SentencePiece);
   - /completion, greedy, 32 tokens, for each prompt, with the top log-probabilities of
     every step (so a test can tell a real difference from a near tie); the quantized
     variants (each architecture with its matrices in Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0, as
     weave::model::blocks writes them) on three prompts.
4. With --gemma, the real Gemma 3 270M Q4_K_M: its vocabulary on the corpus and three prompts,
   and the same prompts on the file widened to F32 by llama-quantize (llama.cpp rounds the
   activations of quantized products to 8 bits; on F32 weights it does not, so weave's exact
   weights meet it closely there). --gemma-only updates just that section of --out.
The fixture keeps the vocabulary and those answers; the test rebuilds the models itself.

Usage:
  BIN=$(tools/golden/build_llama_cpp.sh)
  python3 tools/golden/arch_oracle.py --model ~/.cache/weave/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --llama-bin "$BIN" --out tests/fixtures/arch_oracle.json \
      [--gemma ~/.cache/weave/models/gemma-3-270m-q4_k_m.gguf [--gemma-only]]
Needs: pip install numpy gguf.
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time, urllib.request
from gguf import GGUFReader

VOCAB_SIZE = 1024
N_PREDICT = 32
N_PROBS = 8
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, in a land far away, there lived a king who had three daughters.",
    "1, 2, 3, 4, 5, 6, 7,",
    "Le café était délicieux à Zürich; 東京 was next.",
]


def corpus():
    """200+ strings that exercise a pre-tokenizer: words, contractions, digit runs, runs of
    spaces and newlines, punctuation, code, non-Latin scripts, emoji and special tokens."""
    base = [
        "Hello world", "hello, world!", "HELLO WORLD", "  leading spaces", "trailing spaces   ",
        "a  b   c    d", "tab\tseparated\tvalues", "line one\nline two", "windows\r\nline", "\n\n\n",
        " ", "  ", "\t", "", "x", "I'm here", "you're", "they'll go", "it's", "we've", "she'd",
        "DON'T STOP", "I'M", "Ain't", "o'clock", "rock'n'roll",
        "1", "12", "123", "1234", "12345", "123456789", "3.14159", "1,000,000", "2026-12-04",
        "0x1F", "v1.2.3", "-42", "+7", "1e-5", "100%", "$19.99", "#1", "A1B2C3",
        "!!!", "...", "?!", "--", "@#$%^&*()", "(a)", "[b]", "{c}", "<d>", "a.b.c", "e-mail",
        "snake_case_name", "camelCaseName", "PascalCase", "kebab-case", "path/to/file.rs",
        "https://example.com/a?b=c&d=e", "user@example.com",
        "fn main() {\n    println!(\"hi\");\n}", "def f(x):\n\treturn x ** 2", "if (a && b) { c(); }",
        "for i in range(10):\n    print(i)", "{\"key\": [1, 2, 3]}", "<div class=\"x\">y</div>",
        "SELECT * FROM t WHERE a = 1;", "x = y + z * 2", "    indented", "\t\tdouble tab",
        "café", "naïve", "Zürich", "São Paulo", "façade", "Ελληνικά", "русский язык", "עברית",
        "العربية", "हिन्दी", "中文字符", "日本語のテキスト", "한국어", "ไทย", "😀", "👍🏽", "🇫🇷",
        "emoji 😀 in text", "mixed 中文 and English", "ß", "ﬁ ligature", "Ω≈ç√∫",
        "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "text<|endoftext|>more",
        "<|im_start|>", "<|im_end|>\n",
    ]
    words = ["the", "The", " quick", "brown", "fox's", "jumps", "over", "lazy", "dog", "2024",
             "naïve", "東京", "don't", "x86_64", "v2", "..."]
    templates = ["{w}", " {w}", "{w} {w}", "{w}  {w}", "{w}\n{w}", "({w})", "{w}123", "{w}!"]
    out = list(base)
    for w in words:
        for t in templates:
            out.append(t.format(w=w))
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def cut_vocab(path):
    r = GGUFReader(path)
    f = lambda k: r.fields[k].contents()
    tokens, types, merges = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type"), f("tokenizer.ggml.merges")
    kept = tokens[:VOCAB_SIZE]
    keep = set(kept)
    ms = []
    for m in merges:
        a, b = m.split(" ", 1)
        if a in keep and b in keep and a + b in keep:
            ms.append(m)
    # SmolLM2 splits digits one by one, so its vocabulary has no digit merges, and the
    # pre-tokenizers' digit rules (runs of up to three for llama-bpe, one for qwen2) would
    # look alike: two-digit tokens are added, merged last.
    digits = "0123456789"
    kept = list(kept)
    for a in digits:
        for b in digits:
            if a + b not in keep:
                kept.append(a + b)
                ms.append(f"{a} {b}")
    bos, eos = int(f("tokenizer.ggml.bos_token_id")), int(f("tokenizer.ggml.eos_token_id"))
    assert bos < VOCAB_SIZE and eos < VOCAB_SIZE
    types = [int(t) for t in types[:VOCAB_SIZE]] + [1] * (len(kept) - VOCAB_SIZE)
    return {"model": "gpt2", "tokens": kept, "types": types, "merges": ms,
            "bos": bos, "eos": eos}


def gpt2_byte_decoder():
    """GPT-2's byte-level map, character back to byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def spm_vocab(bpe):
    """A SentencePiece vocabulary made from the BPE one: its special tokens (same ids), the
    256 byte tokens, then each BPE token that is whole UTF-8 as a piece ("▁" for a space),
    scored by its merge rank (earlier merges score higher)."""
    dec = gpt2_byte_decoder()
    n_special = 0
    while bpe["types"][n_special] == 3:
        n_special += 1
    tokens, types, scores = bpe["tokens"][:n_special], [3] * n_special, [0.0] * n_special
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    seen = set(tokens)
    for rank, t in enumerate(bpe["tokens"][n_special:]):
        try:
            text = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        piece = text.replace(" ", "\u2581")
        if piece and piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(1)
            scores.append(-float(rank))
    assert bpe["bos"] < n_special and bpe["eos"] < n_special
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": bpe["bos"], "eos": bpe["eos"]}


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


class Server:
    def __init__(self, bin_dir, model, port):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(model + ".server.log", "w")
        self.p = subprocess.Popen(
            [os.path.join(bin_dir, "llama-server"), "-m", model, "--port", str(port), "-c", "512", "-np", "1",
             "-t", "2", "--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off", "--no-warmup"],
            stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        self.close()
        sys.exit(f"llama-server did not come up on {model}; see {self.log.name}")

    def close(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait()

    def tokenize(self, text, add_special):
        return post(self.url + "/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]

    def complete(self, ids, n_probs, partial):
        """Greedy tokens, then each step's top log-probabilities. llama-server reports a
        step's probabilities only once the text is whole UTF-8, so they come from one
        request per step (the prompt and the tokens so far, one token to generate) in which
        the tokens that are not whole UTF-8 alone (`partial`) are banned from being sampled;
        a ban is a sampler bias, and the probabilities reported are the raw logits'."""
        r = post(self.url + "/completion", {
            "prompt": ids, "n_predict": N_PREDICT, "temperature": 0.0, "cache_prompt": False,
            "ignore_eos": True, "return_tokens": True, "seed": 0,
        })
        tokens = r["tokens"]
        assert len(tokens) == N_PREDICT, f"{len(tokens)} tokens: stop {r.get('stop_type')}"
        ban = [[t, False] for t in partial]
        top = []
        for i in range(N_PREDICT):
            r = post(self.url + "/completion", {
                "prompt": ids + tokens[:i], "n_predict": 1, "temperature": 0.0, "n_probs": n_probs,
                "cache_prompt": False, "ignore_eos": True, "logit_bias": ban, "seed": 0,
            })
            probs = r["completion_probabilities"]
            assert len(probs) == 1, f"step {i}: {len(probs)} entries"
            # [id, log-probability] pairs, rounded past what the tests resolve: a smaller file.
            top.append([[t["id"], round(t["logprob"], 6)] for t in probs[0]["top_logprobs"]])
        return tokens, top


def partial_tokens(vocab):
    """Ids whose text alone is not whole UTF-8 (single bytes of longer characters)."""
    dec = gpt2_byte_decoder()
    out = []
    for i, (t, ty) in enumerate(zip(vocab["tokens"], vocab["types"])):
        if vocab["model"] == "llama":
            if ty == 6 and int(t[3:5], 16) >= 0x80:
                out.append(i)
            continue
        try:
            bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            if ty == 1:
                out.append(i)
    return out


def real_gemma(bin_dir, path):
    """The real Gemma 3 270M: its SentencePiece vocabulary on the corpus, and greedy tokens
    with each step's top log-probabilities on three prompts, on the file as it is and on its
    weights widened to F32 (`f32_weights`)."""
    r = GGUFReader(path)
    vocab = {"model": "llama", "tokens": r.fields["tokenizer.ggml.tokens"].contents(),
             "types": [int(t) for t in r.fields["tokenizer.ggml.token_type"].contents()]}
    partial = partial_tokens(vocab)

    def prompts(s):
        out = []
        for text in PROMPTS[:3]:
            ids = s.tokenize(text, True)
            tokens, top = s.complete(ids, 4, partial)
            out.append({"text": text, "prompt_ids": ids, "tokens": tokens, "top": top})
        return out

    s = Server(bin_dir, path, 18699)
    try:
        out = {"tokenize": [{"text": t, "ids": s.tokenize(t, False)} for t in corpus()], "prompts": prompts(s)}
    finally:
        s.close()
    with tempfile.TemporaryDirectory() as tmp:
        wide = os.path.join(tmp, "gemma-3-270m-f32.gguf")
        subprocess.run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize", path, wide, "F32", "2"],
                       check=True, capture_output=True)
        s = Server(bin_dir, wide, 18698)
        try:
            out["f32_weights"] = {"prompts": prompts(s)}
        finally:
            s.close()
    print("gemma3-270m: recorded", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="SmolLM2's GGUF (for its vocabulary)")
    ap.add_argument("--llama-bin", required=True, help="folder with llama-server (tools/golden/build_llama_cpp.sh)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gemma", help="Gemma 3 270M Q4_K_M (cargo xtask fetch-model gemma3-270m): also record "
                                    "llama.cpp's tokens on the real file and vocabulary")
    ap.add_argument("--gemma-only", action="store_true", help="record only the Gemma section into --out")
    a = ap.parse_args()
    if a.gemma_only:
        if not a.gemma:
            ap.error("--gemma-only needs --gemma")
        fixture = json.load(open(a.out))
        fixture["gemma3_270m"] = real_gemma(a.llama_bin, a.gemma)
        write(fixture, a.out)
        return
    if not a.model:
        ap.error("--model is required (SmolLM2's GGUF, for its vocabulary)")
    bpe = cut_vocab(a.model)
    fixture = {"vocab": bpe, "spm_vocab": spm_vocab(bpe)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        json.dump(fixture, open(vocab_file, "w"))
        out = subprocess.run(["cargo", "run", "-q", "-p", "weave", "--release", "--example", "synth_models", "--",
                              vocab_file, tmp], cwd=root, check=True, capture_output=True, text=True).stdout
        files = dict(line.split(" ", 1) for line in out.strip().splitlines())
        pres = {"llama3": "llama-bpe", "qwen2": "qwen2", "gemma3": "spm"}
        fixture["tokenize"], fixture["models"] = {}, {}
        for i, (name, path) in enumerate(files.items()):
            s = Server(a.llama_bin, path, 18700 + i)
            try:
                if name in pres:
                    fixture["tokenize"][pres[name]] = [{"text": t, "ids": s.tokenize(t, False)} for t in corpus()]
                # The quantized variants (named <arch>-<type>) on fewer prompts and a shorter
                # top list: the fixture stays small.
                quant = "-" in name
                prompts = []
                vocab = fixture["spm_vocab"] if name.startswith("gemma3") else bpe
                partial = partial_tokens(vocab)
                for text in PROMPTS[:3] if quant else PROMPTS:
                    ids = s.tokenize(text, True)
                    tokens, top = s.complete(ids, 4 if quant else N_PROBS, partial)
                    prompts.append({"text": text, "prompt_ids": ids, "tokens": tokens, "top": top})
                fixture["models"][name] = {"prompts": prompts}
                print(f"{name}: {len(prompts)} prompts", file=sys.stderr)
            finally:
                s.close()
    if a.gemma:
        fixture["gemma3_270m"] = real_gemma(a.llama_bin, a.gemma)
    write(fixture, a.out)


def write(fixture, path):
    with open(path, "w") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
