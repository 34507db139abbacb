//! SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`, e.g. Gemma): pieces merge by their
//! scores rather than by a merge list, and characters the vocabulary lacks fall back to byte
//! tokens (`<0x0A>`). Follows llama.cpp's SPM tokenizer so that ids match it: special tokens are
//! cut out of the text first, spaces become `▁`, and adjacent pieces whose concatenation is in
//! the vocabulary merge, highest score first (leftmost on ties), until none can.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};

/// How SentencePiece writes a space.
const SPACE: &str = "\u{2581}";

/// A SentencePiece vocabulary and its merge scores.
pub(super) struct SentencePiece {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// The `<0xXX>` token of each byte, where the vocabulary has one.
    byte_ids: [Option<u32>; 256],
    /// Tokens matched whole in text (control and user-defined), with their ids.
    specials: Option<(AhoCorasick, Vec<u32>)>,
    /// Control tokens: left out of decoded text.
    control: Vec<bool>,
    /// Prepend a space to text that starts the input or follows a special token.
    add_space_prefix: bool,
    unknown: Option<u32>,
}

/// llama.cpp's token types.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

impl SentencePiece {
    /// `types` may be empty (no token types in the file: nothing is special).
    pub(super) fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: &[i64],
        add_space_prefix: bool,
        unknown: Option<u32>,
    ) -> Result<Self, String> {
        if scores.len() != tokens.len() {
            return Err(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            ));
        }
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut byte_ids = [None; 256];
        for (i, token) in tokens.iter().enumerate() {
            if let Some(byte) = byte_token(token) {
                byte_ids[byte as usize] = Some(i as u32);
            }
        }
        let type_of = |i: usize| types.get(i).copied().unwrap_or(1);
        let (patterns, special_ids): (Vec<&str>, Vec<u32>) = tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| matches!(type_of(i), CONTROL | USER_DEFINED) && !t.is_empty())
            .map(|(i, t)| (t.as_str(), i as u32))
            .unzip();
        let specials = if patterns.is_empty() {
            None
        } else {
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .map_err(|e| e.to_string())?;
            Some((matcher, special_ids))
        };
        let control = (0..tokens.len()).map(|i| type_of(i) == CONTROL).collect();
        Ok(Self {
            tokens,
            ids,
            scores,
            byte_ids,
            specials,
            control,
            add_space_prefix,
            unknown,
        })
    }

    /// Token ids of `text` (no BOS).
    pub(super) fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        let raw = |piece: &str, prev_special: bool, out: &mut Vec<u32>| {
            let mut escaped = String::with_capacity(piece.len() + SPACE.len());
            if self.add_space_prefix && prev_special {
                escaped.push_str(SPACE);
            }
            escaped.push_str(&piece.replace(' ', SPACE));
            self.encode_piece(&escaped, out);
        };
        let mut at = 0;
        if let Some((matcher, ids)) = &self.specials {
            for m in matcher.find_iter(text) {
                if m.start() > at {
                    raw(&text[at..m.start()], prev_special, &mut out);
                }
                out.push(ids[m.pattern().as_usize()]);
                prev_special = true;
                at = m.end();
            }
        }
        if at < text.len() {
            raw(&text[at..], prev_special, &mut out);
        }
        out
    }

    /// Merges the characters of `text` (spaces already escaped) by score.
    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols: byte ranges of `text`, linked as a list; a merged-away symbol has len 0.
        let n = text.chars().count();
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            })
            .collect();
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, right: usize| {
            let (l, r) = (&symbols[left], &symbols[right]);
            let joined = &text[l.start..r.start + r.len];
            self.ids.get(joined).map(|&id| Bigram {
                score: self.scores[id as usize],
                left,
                right,
                len: joined.len(),
            })
        };
        for i in 1..n {
            queue.extend(bigram(&symbols, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (left, right) = (symbols[b.left], symbols[b.right]);
            // Stale: one side was merged into something else since.
            if left.len == 0 || right.len == 0 || left.len + right.len != b.len {
                continue;
            }
            symbols[b.left].len += right.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = right.next;
            if let Some(next) = right.next {
                symbols[next].prev = Some(b.left);
            }
            if let Some(prev) = left.prev {
                queue.extend(bigram(&symbols, prev, b.left));
            }
            if let Some(next) = right.next {
                queue.extend(bigram(&symbols, b.left, next));
            }
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                // Only single characters can be missing: merges always make known pieces.
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.byte_ids[b as usize].or(self.unknown)),
                ),
            }
            at = s.next;
        }
    }

    /// Text of `ids`, control tokens left out, byte tokens joined into UTF-8.
    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(token) = self.tokens.get(id as usize) else {
                continue;
            };
            if self.control[id as usize] {
                continue;
            }
            match byte_token(token) {
                Some(b) => bytes.push(b),
                None => bytes.extend_from_slice(token.replace(SPACE, " ").as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match text.strip_prefix(' ') {
            Some(rest) if self.add_space_prefix => rest.to_owned(),
            _ => text,
        }
    }
}

/// The byte a `<0xXX>` token stands for.
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged piece, to tell a stale candidate from a live one.
    len: usize,
}

impl Ord for Bigram {
    /// Higher score first; on equal scores, the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: specials, bytes for a newline, and pieces whose scores decide merges.
    fn toy() -> SentencePiece {
        let entries: [(&str, f32, i64); 12] = [
            ("<unk>", 0.0, 2),
            ("<bos>", 0.0, CONTROL),
            ("<turn>", 0.0, USER_DEFINED),
            ("<0x0A>", 0.0, 6),
            ("a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -1.0, 1),
            ("\u{2581}", -1.0, 1),
            ("ab", -3.0, 1),
            ("bc", -2.0, 1),
            ("abc", -2.5, 1),
            ("\u{2581}a", -4.0, 1),
        ];
        SentencePiece::new(
            entries.iter().map(|e| e.0.to_owned()).collect(),
            entries.iter().map(|e| e.1).collect(),
            &entries.iter().map(|e| e.2).collect::<Vec<_>>(),
            false,
            Some(0),
        )
        .unwrap()
    }

    #[test]
    fn merges_by_score_not_by_position() {
        let t = toy();
        // "bc" (-2) beats "ab" (-3); then "a"+"bc" = "abc" merges.
        assert_eq!(t.encode("abc"), vec![10]);
        // "ab" then no "abb": two tokens.
        assert_eq!(t.encode("abb"), vec![8, 5]);
        // Spaces are pieces of their own unless a merge takes them.
        assert_eq!(t.encode("a a"), vec![4, 11]);
    }

    #[test]
    fn special_tokens_are_cut_out_and_unknown_characters_fall_back_to_bytes() {
        let t = toy();
        assert_eq!(t.encode("a<turn>b\n"), vec![4, 2, 5, 3]);
        // 'é' has no token and no byte tokens here: the unknown token per byte.
        assert_eq!(t.encode("é"), vec![0, 0]);
        assert_eq!(t.decode(&[1, 4, 11, 2, 3]), "a a<turn>\n");
    }

    #[test]
    fn space_prefix_when_asked() {
        let mut t = toy();
        t.add_space_prefix = true;
        assert_eq!(t.encode("a"), vec![11]);
        assert_eq!(t.decode(&[11]), "a");
    }
}
