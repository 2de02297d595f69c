//! Structured outputs: a request's output held to a JSON schema, any JSON object, a regex, a
//! choice among strings or a Lark grammar, through `llguidance` (the engine llama.cpp and vLLM
//! use).
//!
//! **Owns**: the constraint a request asks for ([`Constraint`], parsed from the API's fields
//! in [`fields`]), its compilation into a [`Guide`] (a matcher over the model's tokens, built
//! by the per-model [`GuideFactory`]), the engine's per-request guides and their token masks
//! ([`masks`]: computed on worker threads while the step runs), and Hermes tool calls
//! ([`tools`]).
//!
//! **Must not**: sample, or know the batch's layout beyond the rows a backend hands it: the
//! engine asks for masks, a backend applies them.

pub mod fields;
pub mod masks;
pub mod tools;

use crate::model::tokenizer::WeaveTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema.
    JsonSchema(serde_json::Value),
    /// A regular expression the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Grammar(String),
}

impl Constraint {
    /// Its kind, as logs and metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonObject => "json_object",
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::Regex(_) => "regex",
            Constraint::Choice(_) => "choice",
            Constraint::Grammar(_) => "grammar",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Constraint::JsonObject => json_grammar(serde_json::json!({"type": "object"})),
            Constraint::JsonSchema(s) => json_grammar(s.clone()),
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Choice(options) => {
                if options.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                // Lark string literals take JSON's escapes.
                let alts: Vec<String> =
                    options.iter().map(|o| serde_json::to_string(o).expect("a string serializes")).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Constraint::Grammar(g) => {
                if g.trim().is_empty() {
                    return Err("the grammar is empty".into());
                }
                TopLevelGrammar::from_lark(g.clone())
            }
        })
    }
}

/// Whitespace between JSON tokens, where the schema does not say otherwise: nothing, one
/// space, or a newline and up to 20 spaces or tabs of indent (llama.cpp's bound). Unbounded
/// whitespace lets a sampled model pad forever (seen: a small model at temperature 1 spent
/// its whole budget on newlines).
pub const JSON_WHITESPACE: &str = r"(\x20|\x0A[\x20\x09]{0,20})";

/// llguidance's grammar for a JSON schema, with weave's defaults as `x-guidance` options the
/// schema may override: `oneOf` taken as `anyOf` (what vLLM and llama.cpp do: exact when the
/// alternatives do not overlap, which is how schemas use it) and bounded whitespace.
fn json_grammar(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let Some(opts) = guidance_options(&mut schema) {
        opts.entry("coerce_one_of").or_insert(serde_json::Value::Bool(true));
        let compact = opts.get("whitespace_flexible") == Some(&serde_json::Value::Bool(false));
        if !compact {
            opts.entry("whitespace_pattern").or_insert_with(|| JSON_WHITESPACE.into());
        }
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// A JSON schema's llguidance options (its `x-guidance` object, made empty when absent);
/// `None` for a schema that is not an object (`true`, `false`) or whose options are not one.
fn guidance_options(schema: &mut serde_json::Value) -> Option<&mut serde_json::Map<String, serde_json::Value>> {
    schema.as_object_mut()?.entry("x-guidance").or_insert_with(|| serde_json::json!({})).as_object_mut()
}

/// A compiled constraint: llguidance's matcher over the model's tokens, at the output's start.
pub struct Guide {
    pub matcher: Matcher,
    pub kind: &'static str,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("kind", &self.kind).field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Clone for Guide {
    /// An independent copy (its own lexer caches), for another sample of the same request.
    fn clone(&self) -> Self {
        Guide { matcher: self.matcher.deep_clone(), kind: self.kind }
    }
}

/// The model's tokens as llguidance sees them, and the parser factory built over them: made
/// once per model (the token trie of a 49k vocabulary takes a while), shared by every request.
pub struct GuideFactory {
    factory: ParserFactory,
    /// Tokens that end a turn: allowed wherever the grammar allows EOS.
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for GuideFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuideFactory").field("vocab", &self.vocab_size()).finish()
    }
}

/// [`TokenizerEnv`] over weave's tokenizer: the trie from its token bytes, tokenizing through it.
struct Env {
    trie: TokTrie,
    tok: WeaveTokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tok.encode_plain(text),
            // Not text: the trie's greedy split is a valid tokenization of any bytes.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        true
    }
}

impl GuideFactory {
    /// The factory for a model with `vocab_size` logits per row and this tokenizer. Ids past
    /// the tokenizer's (a padded vocabulary) are never allowed.
    pub fn new(tok: &WeaveTokenizer, vocab_size: usize) -> anyhow::Result<GuideFactory> {
        let mut words: Vec<Vec<u8>> = tok
            .token_bytes()
            .into_iter()
            .enumerate()
            .map(|(id, b)| match b {
                Some((bytes, false)) => bytes,
                Some((bytes, true)) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &bytes].concat(),
                None => format!("\u{ff}<[{id}]>").into_bytes(),
            })
            .collect();
        // The trie is as wide as the logits; a token the tokenizer lacks is a special
        // placeholder no grammar names.
        while words.len() < vocab_size {
            let id = words.len();
            words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("<[{id}]>").as_bytes()].concat());
        }
        words.truncate(vocab_size.max(1));
        let eos = tok.eos.or(tok.stop_ids.first().copied()).unwrap_or(0);
        let mut info = TokRxInfo::new(words.len() as u32, eos);
        info.tok_bos = tok.bos;
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tok: tok.clone() });
        let mut factory = ParserFactory::new_simple(&env)?;
        // Quiet: a bad grammar is the request's error, not the server's log.
        factory.quiet();
        Ok(GuideFactory { factory, stop_ids: tok.stop_ids.clone() })
    }

    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// The trie's EOS token.
    pub fn eos(&self) -> u32 {
        self.factory.tok_env().tok_trie().eos_token()
    }

    /// Tokens that end a turn, allowed beside EOS.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Compiles `c`; the error is llguidance's reason, for the caller to name the field.
    pub fn compile(&self, c: &Constraint) -> Result<Guide, String> {
        let grammar = c.grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Guide { matcher, kind: c.kind() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factory() -> GuideFactory {
        GuideFactory::new(&WeaveTokenizer::bytes(), 300).unwrap()
    }

    /// Feeds `text` byte by byte (the byte tokenizer's ids are the bytes), checking each byte
    /// is allowed by the mask first.
    fn feed(g: &mut Guide, text: &str) -> Result<(), String> {
        for &b in text.as_bytes() {
            let m = g.matcher.compute_mask().map_err(|e| e.to_string())?;
            if !m.is_allowed(b as u32) {
                return Err(format!("byte {:?} not allowed", b as char));
            }
            g.matcher.consume_token(b as u32).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    #[test]
    fn each_kind_compiles_and_holds_output_to_its_language() {
        let f = factory();
        let schema = serde_json::json!({"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false});
        let mut g = f.compile(&Constraint::JsonSchema(schema)).unwrap();
        assert!(feed(&mut g.clone(), "{\"b\"").is_err(), "a key the schema does not have");
        feed(&mut g, "{\"a\": 12}").unwrap();
        assert!(g.matcher.is_accepting().unwrap());
        let mut g = f.compile(&Constraint::Regex("[0-9]{3}-x".into())).unwrap();
        assert!(feed(&mut g.clone(), "12a").is_err());
        feed(&mut g, "123-x").unwrap();
        assert!(g.matcher.is_stopped(), "a finished regex allows only EOS");
        let mut g = f.compile(&Constraint::Choice(vec!["yes".into(), "no \"way\"".into()])).unwrap();
        assert!(feed(&mut g.clone(), "ye!").is_err());
        feed(&mut g, "no \"way\"").unwrap();
        assert!(g.matcher.is_stopped());
        let mut g = f.compile(&Constraint::Grammar("start: \"a\"+ \"b\"".into())).unwrap();
        feed(&mut g, "aaab").unwrap();
        let mut g = f.compile(&Constraint::JsonObject).unwrap();
        assert!(feed(&mut g.clone(), "[").is_err());
        feed(&mut g, "{\"k\": [1, \"x\"]}").unwrap();
    }

    #[test]
    fn one_of_is_taken_and_compact_json_has_no_spaces() {
        let f = factory();
        let s = serde_json::json!({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]});
        let mut g = f.compile(&Constraint::JsonSchema(s)).unwrap();
        feed(&mut g, "\"ab\"").unwrap();
        let s = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "x-guidance": {"whitespace_flexible": false}});
        let g = f.compile(&Constraint::JsonSchema(s)).unwrap();
        assert!(feed(&mut g.clone(), "{ ").is_err());
        feed(&mut g.clone(), "{\"a\":1}").unwrap();
    }

    #[test]
    fn json_whitespace_is_bounded() {
        let f = factory();
        let mut g = f.compile(&Constraint::JsonObject).unwrap();
        feed(&mut g, "{\n  \"a\": [1, 2],\n\t\"b\": {}\n}").unwrap();
        let g = f.compile(&Constraint::JsonObject).unwrap();
        assert!(feed(&mut g.clone(), "{\n\n").is_err(), "two newlines in a row");
        assert!(feed(&mut g.clone(), &format!("{{\n{}", " ".repeat(21))).is_err(), "21 spaces of indent");
    }

    #[test]
    fn bad_constraints_are_refused_with_a_reason() {
        let f = factory();
        for c in [
            Constraint::Regex("(unclosed".into()),
            Constraint::Grammar("start: undefined_rule".into()),
            Constraint::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            Constraint::Choice(vec![]),
            Constraint::Grammar("  ".into()),
        ] {
            let e = f.compile(&c).expect_err(&format!("{c:?} compiled"));
            assert!(!e.is_empty(), "{c:?}: empty reason");
        }
    }

    #[test]
    fn padded_ids_are_never_allowed() {
        let f = factory();
        assert_eq!(f.vocab_size(), 300);
        let mut g = f.compile(&Constraint::Regex(".*".into())).unwrap();
        let m = g.matcher.compute_mask().unwrap();
        assert!(m.is_allowed(b'a' as u32));
        assert!((256..300).all(|t| !m.is_allowed(t)));
    }
}
