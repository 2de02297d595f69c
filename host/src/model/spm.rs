//! SentencePiece tokenizing as a GGUF `llama` vocabulary describes it (Gemma, Llama 2): pieces
//! with scores, `▁` for a space, and byte fallback (`<0xAB>` tokens) for what no piece spells.
//!
//! Written here rather than taken from a crate: a GGUF carries only the pieces and their
//! scores, and llama.cpp (the reference for these files) merges by them greedily: start from
//! single characters and, while any two neighbours spell a piece, join the pair whose piece
//! scores highest (the leftmost on a tie). The `tokenizers` crate's Unigram model finds the
//! best-scoring segmentation instead, which is another tokenization.

use std::collections::{BinaryHeap, HashMap};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

#[derive(Debug, Clone)]
pub struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    by_piece: HashMap<String, u32>,
    /// `byte_tokens[b]`: the `<0xBB>` token of byte `b`, if the vocabulary has it.
    byte_tokens: [Option<u32>; 256],
    /// Control and user-defined tokens, longest first: matched whole in the text before the
    /// pieces are merged (llama.cpp's partition).
    specials: Vec<(String, u32)>,
    /// Whether a text fragment at the start, or after a special token, gets a leading space.
    pub add_space_prefix: bool,
}

/// A merge candidate: the neighbours `left`, `right` and the score of the piece they spell.
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Highest score first; on a tie, the leftmost.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// A span of the text being merged, in a doubly linked list over the characters.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// From the vocabulary's pieces, scores and token types (one each per token).
    pub fn new(pieces: Vec<String>, scores: Vec<f32>, types: Vec<i32>, add_space_prefix: bool) -> Result<Spm, String> {
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(format!("{} pieces but {} scores and {} token types", pieces.len(), scores.len(), types.len()));
        }
        let mut by_piece = HashMap::with_capacity(pieces.len());
        let mut byte_tokens = [None; 256];
        let mut specials = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let id = i as u32;
            match types[i] {
                BYTE => {
                    let b = p
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| format!("byte token {i} is {p:?}, not <0xAB>"))?;
                    byte_tokens[b as usize] = Some(id);
                }
                CONTROL | USER_DEFINED if !p.is_empty() => specials.push((p.clone(), id)),
                _ => {}
            }
            // The first token of a spelling wins, as in llama.cpp's map.
            by_piece.entry(p.clone()).or_insert(id);
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Spm { pieces, scores, types, by_piece, byte_tokens, specials, add_space_prefix })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Token ids of `text` (no BOS); special-token text maps to its token.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.merge(&s.replace(' ', "\u{2581}"), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// The text split around special tokens, the longest matched first.
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        for (sp, id) in &self.specials {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(mut t) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = t.find(sp.as_str()) {
                    if at > 0 {
                        next.push(Fragment::Text(&t[..at]));
                    }
                    next.push(Fragment::Special(*id));
                    t = &t[at + sp.len()..];
                }
                if !t.is_empty() {
                    next.push(Fragment::Text(t));
                }
            }
            frags = next;
        }
        frags
    }

    /// The greedy merge of one escaped fragment, appended to `out`.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = syms.len();
            syms.push(Symbol { start, len: c.len_utf8(), prev: i.checked_sub(1), next: None });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let spell = |syms: &[Symbol], l: usize, r: usize| &text[syms[l].start..syms[r].start + syms[r].len];
        let try_add = |queue: &mut BinaryHeap<Bigram>, syms: &[Symbol], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            if let Some(&id) = self.by_piece.get(spell(syms, l, r)) {
                let len = syms[l].len + syms[r].len;
                queue.push(Bigram { score: self.scores[id as usize], left: l, right: r, len });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut queue, &syms, Some(i - 1), Some(i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            // Stale: one side merged since.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len || l.next != Some(b.right) {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(b.left);
            }
            try_add(&mut queue, &syms, syms[b.left].prev, Some(b.left));
            try_add(&mut queue, &syms, Some(b.left), syms[b.left].next);
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let s = syms[k];
            let piece = &text[s.start..s.start + s.len];
            match self.by_piece.get(piece) {
                Some(&id) => out.push(id),
                // A character no piece spells: its bytes.
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = s.next;
        }
    }

    /// Each token's bytes as the model reads and writes them (`▁` a space, `<0xAB>` its
    /// byte), and whether it is a special (control) token.
    pub fn token_bytes(&self, id: u32) -> Option<(Vec<u8>, bool)> {
        let p = self.pieces.get(id as usize)?;
        Some(match self.types[id as usize] {
            BYTE => (vec![self.byte_tokens.iter().position(|&t| t == Some(id)).expect("a byte token") as u8], false),
            CONTROL => (p.as_bytes().to_vec(), true),
            _ => (p.replace('\u{2581}', " ").into_bytes(), false),
        })
    }

    /// The text of `ids`; control tokens decode to nothing, bytes are joined before UTF-8 is
    /// read (a character may span byte tokens).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            match self.token_bytes(id) {
                Some((_, true)) | None => {}
                Some((b, false)) => bytes.extend(b),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` is a normal piece (neither special nor a byte).
    pub fn is_normal(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&NORMAL)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small vocabulary: control tokens, byte tokens for every byte, and scored pieces.
    fn spm(add_space_prefix: bool) -> Spm {
        let mut pieces: Vec<String> = vec!["<pad>".into(), "<eos>".into(), "<bos>".into(), "<start>".into()];
        let mut types = vec![CONTROL; 4];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
        }
        let scored = [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("c", -2.0),
            ("ab", -3.0),
            ("bc", -1.5),
            ("▁a", -2.5),
            ("abc", -4.0),
            ("▁abc", -5.0),
            ("é", -6.0),
        ];
        let mut scores = vec![0.0; pieces.len()];
        for (p, s) in scored {
            pieces.push(p.into());
            types.push(NORMAL);
            scores.push(s);
        }
        Spm::new(pieces, scores, types, add_space_prefix).unwrap()
    }

    fn id(s: &Spm, p: &str) -> u32 {
        s.by_piece[p]
    }

    /// The highest-scoring neighbours merge first: in "abc", "bc" (−1.5) beats "ab" (−3), and
    /// "abc" is then reached only from "a" + "bc".
    #[test]
    fn the_best_scoring_pair_merges_first() {
        let s = spm(false);
        assert_eq!(s.encode("abc"), [id(&s, "abc")]);
        assert_eq!(s.encode("ab"), [id(&s, "ab")]);
        assert_eq!(s.encode("cab"), [id(&s, "c"), id(&s, "ab")]);
        // "bcbc": both "bc" pairs merge; the two are not a piece together.
        assert_eq!(s.encode("bcbc"), [id(&s, "bc"), id(&s, "bc")]);
    }

    #[test]
    fn spaces_become_the_marker_and_a_prefix_is_added_where_asked() {
        let (plain, prefixed) = (spm(false), spm(true));
        assert_eq!(plain.encode("a abc"), [id(&plain, "a"), id(&plain, "▁abc")]);
        assert_eq!(prefixed.encode("abc"), [id(&prefixed, "▁abc")]);
        assert_eq!(plain.encode(""), Vec::<u32>::new());
    }

    /// What no piece spells goes out as its UTF-8 bytes; decoding joins them back.
    #[test]
    fn byte_fallback_and_decoding() {
        let s = spm(false);
        let ids = s.encode("a€");
        let euro: Vec<u32> = "€".bytes().map(|b| 4 + b as u32).collect();
        assert_eq!(ids[0], id(&s, "a"));
        assert_eq!(&ids[1..], euro.as_slice());
        assert_eq!(s.decode(&ids), "a€");
        assert_eq!(s.decode(&s.encode("c abc é")), "c abc é");
    }

    /// Special tokens are cut out whole, and a text fragment after one is prefixed again.
    #[test]
    fn special_tokens_split_the_text() {
        let s = spm(true);
        assert_eq!(s.encode("<start>abc<eos>"), [3, id(&s, "▁abc"), 1]);
        assert_eq!(s.encode("a<start>"), [id(&s, "▁a"), 3]);
        assert_eq!(s.decode(&[3, id(&s, "▁abc"), 1]), " abc", "control tokens decode to nothing");
        assert_eq!(s.token_bytes(3), Some((b"<start>".to_vec(), true)));
    }

    #[test]
    fn a_malformed_vocabulary_is_refused() {
        let e = Spm::new(vec!["<0xZZ>".into()], vec![0.0], vec![BYTE], false).unwrap_err();
        assert!(e.contains("<0xZZ>"), "{e}");
        assert!(Spm::new(vec!["a".into()], vec![], vec![NORMAL], false).is_err());
    }
}
