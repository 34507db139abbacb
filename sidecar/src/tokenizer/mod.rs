//! The tokenizer, rebuilt from a GGUF file's metadata (no tokenizer.json needed).
//!
//! Two kinds, as llama.cpp names them in `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE (SmolLM2, Qwen2), built from the vocabulary and merge list; the
//!   pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp does. candle's own GGUF
//!   tokenizer does not know the `smollm` pre-tokenizer (digits split one by one) and gets ids
//!   wrong, hence this module.
//! - `llama`: SentencePiece-style BPE by piece scores with byte fallback (Gemma), in `spm`.

mod spm;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};

/// llama.cpp's pre-tokenizer regex for `qwen2` and `deepseek-r1-qwen` (Qwen2 and the R1
/// distills): case-insensitive contractions, a letter run may take one leading non-letter
/// (`(bar`, a tab before a word), digits one by one, runs of newlines kept whole.
const QWEN2_PRE_TOKENIZER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types: 3 = control, 4 = user-defined; both are matched whole in text.
const SPECIAL_TOKEN_TYPES: [i64; 2] = [3, 4];

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error(
        "tokenizer model `{model}` (pre-tokenizer `{pre}`) is not supported yet; supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)"
    )]
    Unsupported { model: String, pre: String },
    #[error("tokenizer: {0}")]
    Library(String),
}

/// Text to token ids and back, plus the ids generation needs to know.
pub struct GgufTokenizer {
    inner: Inner,
    /// End-of-sequence id(s): generation stops on any of these.
    pub eos_ids: Vec<u32>,
    /// Beginning-of-sequence id, prepended when the model asks for it.
    pub bos_id: Option<u32>,
    /// Whether the model expects a BOS token before the prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    tokens: Vec<String>,
}

/// The tokenizer proper, by kind.
enum Inner {
    ByteLevel(Box<tokenizers::Tokenizer>),
    SentencePiece(Box<spm::SentencePiece>),
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
        let tokens: Vec<String> = gguf
            .strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let types = gguf
            .integers("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let flag = |key: &str| gguf.value(key).and_then(|v| v.to_bool().ok());
        let inner = match model {
            "gpt2" => Inner::ByteLevel(Box::new(byte_level(gguf, &tokens, &types, pre)?)),
            "llama" => Inner::SentencePiece(Box::new(
                spm::SentencePiece::new(
                    tokens.clone(),
                    gguf.floats("tokenizer.ggml.scores")?,
                    &types,
                    flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                    gguf.u32_opt("tokenizer.ggml.unknown_token_id"),
                )
                .map_err(TokenizerError::Library)?,
            )),
            _ => {
                return Err(TokenizerError::Unsupported {
                    model: model.to_owned(),
                    pre: pre.to_owned(),
                });
            }
        };
        let eos = gguf.u32("tokenizer.ggml.eos_token_id")?;
        let mut eos_ids = vec![eos];
        // Chat models often end a turn with a token other than the declared EOS.
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(id) = tokens.iter().position(|t| t == name) {
                let id = id as u32;
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Self {
            inner,
            eos_ids,
            bos_id: gguf.u32_opt("tokenizer.ggml.bos_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
            tokens,
        })
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        match &self.inner {
            Inner::ByteLevel(inner) => {
                let encoding = inner
                    .encode(text, false)
                    .map_err(|e| TokenizerError::Library(e.to_string()))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Inner::SentencePiece(inner) => ids.extend(inner.encode(text)),
        }
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special (control) tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.inner {
            Inner::ByteLevel(inner) => inner
                .decode(ids, true)
                .map_err(|e| TokenizerError::Library(e.to_string())),
            Inner::SentencePiece(inner) => Ok(inner.decode(ids)),
        }
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token string of an id, as stored in the GGUF file.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.tokens
            .iter()
            .position(|t| t == token)
            .map(|i| i as u32)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` = `pre`, then the byte-level
/// mapping.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    Ok(match pre {
        // SmolLM splits digits one by one before the GPT-2 regex.
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, false, true).into(),
        ])
        .into(),
        "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(QWEN2_PRE_TOKENIZER.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Library(e.to_string()))?
            .into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, false, true).into(),
    })
}

/// A byte-level BPE (`gpt2`) from the vocabulary and merge list.
fn byte_level(
    gguf: &GgufFile,
    tokens: &[String],
    types: &[i64],
    pre: &str,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges: Vec<(String, String)> = gguf
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Library(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre_tokenizer = pre_tokenizer(pre)?;
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| SPECIAL_TOKEN_TYPES.contains(t))
        .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
        .collect();
    inner
        .add_special_tokens(specials)
        .map_err(|e| TokenizerError::Library(e.to_string()))?;
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// The pieces `pre` cuts `text` into, before byte-level mapping.
    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let mut split = PreTokenizedString::from(text);
        pre_tokenizer(pre)
            .unwrap()
            .pre_tokenize(&mut split)
            .unwrap();
        split
            .get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(_, (start, end), _)| text.chars().skip(start).take(end - start).collect())
            .collect()
    }

    #[test]
    fn qwen2_pieces_follow_llama_cpps_regex() {
        // Each case is where the GPT-2 regex cuts differently (and llama.cpp's ids for the R1
        // distill's vocabulary differed from ours before this pre-tokenizer).
        for pre in ["qwen2", "deepseek-r1-qwen"] {
            assert_eq!(pieces(pre, "foo(bar)"), ["foo", "(bar", ")"]);
            assert_eq!(pieces(pre, "a\ttabs"), ["a", "\ttabs"]);
            assert_eq!(pieces(pre, "a\n\n\nb"), ["a", "\n\n\n", "b"]);
            assert_eq!(pieces(pre, "I'LL go"), ["I", "'LL", " go"]);
            assert_eq!(pieces(pre, "x 123"), ["x", " ", "1", "2", "3"]);
        }
        // SmolLM keeps the GPT-2 regex with digits split.
        assert_eq!(pieces("smollm", "foo(bar)"), ["foo", "(", "bar", ")"]);
        assert_eq!(pieces("smollm", "x 123"), ["x", " ", "1", "2", "3"]);
    }
}
