//! The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata, built on Hugging
//! Face's `tokenizers` (byte-level BPE), and a streaming decoder that only emits whole UTF-8.

use super::gguf::{Gguf, GgufError};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

/// Pre-tokenizers weave can build, by GGUF `tokenizer.ggml.pre` name.
pub const SUPPORTED_PRE: &[&str] = &["default", "gpt2", "smollm", "llama-bpe", "qwen2"];

/// Llama 3's split before byte-level BPE (llama.cpp's "llama-bpe"; its tokenizer.json's, with
/// the case-insensitive contractions spelled out): letters with one leading non-letter, digits
/// in runs of at most three, punctuation runs, newlines, and spaces.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's (and Qwen3's): Llama 3's with every digit on its own.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model {model:?} is not supported (weave reads byte-level BPE, \"gpt2\", and SentencePiece, \"llama\")")]
    Model { path: String, model: String },
    #[error("{path}: pre-tokenizer {pre:?} is not supported (supported: {})", SUPPORTED_PRE.join(", "))]
    Pre { path: String, pre: String },
    #[error("{path}: cannot build the tokenizer: {msg}")]
    Build { path: String, msg: String },
    #[error("cannot tokenize: {0}")]
    Encode(String),
}

/// The tokenizing model a file names (`tokenizer.ggml.model`).
#[derive(Debug, Clone)]
enum Inner {
    /// `gpt2`: byte-level BPE, through the `tokenizers` crate.
    Bpe(Box<Tokenizer>),
    /// `llama`: SentencePiece pieces and scores (Gemma, Llama 2).
    Spm(Box<super::spm::Spm>),
}

#[derive(Debug, Clone)]
pub struct WeaveTokenizer {
    inner: Inner,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens the model emits to end a turn (EOS, and e.g. `<|im_end|>` / `<|endoftext|>`).
    pub stop_ids: Vec<u32>,
    pub bos_text: String,
    pub eos_text: String,
}

impl WeaveTokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<WeaveTokenizer, TokenizerError> {
        let path = g.path.display().to_string();
        let model = g.get_str("tokenizer.ggml.model")?;
        let inner = match model {
            "gpt2" => Inner::Bpe(Box::new(Self::bpe_from_gguf(g, &path)?)),
            "llama" => {
                let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
                let scores = match g.get("tokenizer.ggml.scores")? {
                    super::gguf::Value::Array(v) => v.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect(),
                    _ => {
                        return Err(TokenizerError::Build { path, msg: "tokenizer.ggml.scores is not an array".into() })
                    }
                };
                let types = g.get_u64_array("tokenizer.ggml.token_type").map_err(|_| TokenizerError::Build {
                    path: path.clone(),
                    msg: "tokenizer.ggml.token_type is missing or not integers".into(),
                })?;
                // llama.cpp's default for SentencePiece vocabularies is a leading space.
                let prefix = !matches!(g.get("tokenizer.ggml.add_space_prefix"), Ok(super::gguf::Value::Bool(false)));
                let spm = super::spm::Spm::new(
                    tokens.iter().map(|t| t.to_string()).collect(),
                    scores,
                    types.iter().map(|&t| t as i32).collect(),
                    prefix,
                )
                .map_err(|msg| TokenizerError::Build { path: path.clone(), msg })?;
                Inner::Spm(Box::new(spm))
            }
            other => return Err(TokenizerError::Model { path, model: other.into() }),
        };
        Self::with_specials(g, inner)
    }

    /// The byte-level BPE tokenizer of a `gpt2` vocabulary, with its pre-tokenizer.
    fn bpe_from_gguf(g: &Gguf, path: &str) -> Result<Tokenizer, TokenizerError> {
        let path = path.to_string();
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            "default" | "gpt2" => byte_level.into(),
            // SmolLM: every digit on its own, then GPT-2's byte-level split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            // The regex does the splitting; the byte-level step only maps bytes to characters.
            "llama-bpe" | "qwen2" => {
                let pattern = if pre == "qwen2" { QWEN2_SPLIT } else { LLAMA3_SPLIT };
                let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| TokenizerError::Build { path: path.clone(), msg: format!("{pre} split: {e}") })?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            other => return Err(TokenizerError::Pre { path, pre: other.into() }),
        };
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        let types = g.get_u64_array("tokenizer.ggml.token_type").unwrap_or_default();
        let vocab: Vec<(String, u32)> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| TokenizerError::Build {
                    path: path.clone(),
                    msg: format!("merge {m:?} has no space"),
                })
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .build()
            .map_err(|e| TokenizerError::Build { path: path.clone(), msg: e.to_string() })?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens match whole, before BPE.
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| AddedToken::from(tokens[i].to_string(), t == 3))
            .collect();
        inner.add_special_tokens(&special);
        Ok(inner)
    }

    /// BOS, EOS, the end-of-turn tokens and `add_bos` from the file, around `inner`.
    fn with_specials(g: &Gguf, inner: Inner) -> Result<WeaveTokenizer, TokenizerError> {
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let id = |k: &str| g.get_u64(k).ok().map(|v| v as u32);
        let (bos, eos) = (id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"));
        let text = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize)).map(|s| s.to_string()).unwrap_or_default();
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for extra in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(i) = tokens.iter().position(|t| *t == extra) {
                if !stop_ids.contains(&(i as u32)) {
                    stop_ids.push(i as u32);
                }
            }
        }
        // Absent, llama.cpp adds BOS for SentencePiece vocabularies and not for BPE ones.
        let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
            Ok(super::gguf::Value::Bool(b)) => *b,
            _ => matches!(inner, Inner::Spm(_)),
        };
        Ok(WeaveTokenizer { bos_text: text(bos), eos_text: text(eos), inner, bos, eos, add_bos, stop_ids })
    }

    /// One token per byte (GPT-2's byte-to-character map, no merges, no special tokens): the
    /// tokenizer of dummy-weight models, which come with no vocabulary. Ids past 255, which
    /// such a model may sample, decode to nothing.
    pub fn bytes() -> WeaveTokenizer {
        let vocab: tokenizers::models::bpe::Vocab =
            gpt2_byte_chars().iter().enumerate().map(|(b, c)| (c.to_string(), b as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().expect("a byte vocabulary builds");
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        WeaveTokenizer {
            inner: Inner::Bpe(Box::new(inner)),
            bos: None,
            eos: None,
            add_bos: false,
            stop_ids: Vec::new(),
            bos_text: String::new(),
            eos_text: String::new(),
        }
    }

    /// Token ids of `text`, with BOS first when the file says so. Special-token text (e.g.
    /// `<|im_start|>`) maps to its token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Inner::Bpe(t) => {
                let enc = t.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Inner::Spm(s) => ids.extend(s.encode(text)),
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.inner {
            Inner::Bpe(t) => t.decode(ids, false).unwrap_or_default(),
            Inner::Spm(s) => s.decode(ids),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Bpe(t) => t.get_vocab_size(true),
            Inner::Spm(s) => s.vocab_size(),
        }
    }

    /// Token ids of `text` with no BOS (special-token text still maps to its token).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        match &self.inner {
            Inner::Bpe(t) => t.encode_fast(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default(),
            Inner::Spm(s) => s.encode(text),
        }
    }

    /// Each token's bytes, as the model reads and writes them: a byte-level token's string
    /// mapped back through GPT-2's byte-to-character table, and a special (control or
    /// user-defined) token's text marked special by `special` (`None` when it is not one).
    /// Ids the tokenizer does not know (a vocabulary padded past it) get `None`.
    pub fn token_bytes(&self) -> Vec<Option<(Vec<u8>, bool)>> {
        let t = match &self.inner {
            Inner::Bpe(t) => t,
            Inner::Spm(s) => return (0..s.vocab_size() as u32).map(|id| s.token_bytes(id)).collect(),
        };
        let chars: std::collections::HashMap<char, u8> =
            gpt2_byte_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let added = t.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(a) = added.get(&id) {
                    return Some((a.content.as_bytes().to_vec(), a.special));
                }
                let s = t.id_to_token(id)?;
                // A character outside the table cannot be a byte-level token's: keep its UTF-8.
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    match chars.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                Some((out, false))
            })
            .collect()
    }
}

/// GPT-2's byte-level map, the character each byte stands for: printable bytes stand for
/// themselves, the others for `256 + k` in byte order.
fn gpt2_byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0;
    for (b, c) in out.iter_mut().enumerate() {
        let b = b as u32;
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        *c = if printable {
            char::from_u32(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra)
        }
        .expect("a valid char");
    }
    out
}

/// Incremental detokenization: text is released only once it is whole UTF-8, so a character
/// split across tokens never shows up as a replacement character.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded for context.
    prefix: usize,
    /// Tokens whose text was already released.
    read: usize,
}

impl StreamDecoder {
    /// Adds a token; returns the newly complete text (possibly empty).
    pub fn push(&mut self, tok: &WeaveTokenizer, id: u32) -> String {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read]);
        let now = tok.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{fffd}') {
            let new = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            new
        } else {
            String::new()
        }
    }
}
