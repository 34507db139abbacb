//! The tokenizer, rebuilt from a GGUF file's metadata (no tokenizer.json needed).
//!
//! Byte-level BPE models (`tokenizer.ggml.model = "gpt2"`) are built from the vocabulary and merge
//! list; the pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp does. candle's own GGUF
//! tokenizer does not know the `smollm` pre-tokenizer (digits split one by one) and gets ids
//! wrong, hence this module.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::gguf::{GgufError, GgufFile};

/// llama.cpp's token types: 3 = control, 4 = user-defined; both are matched whole in text.
const SPECIAL_TOKEN_TYPES: [i64; 2] = [3, 4];

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error(
        "tokenizer model `{model}` (pre-tokenizer `{pre}`) is not supported yet; supported: gpt2-style byte-level BPE"
    )]
    Unsupported { model: String, pre: String },
    #[error("tokenizer: {0}")]
    Library(String),
}

/// Text to token ids and back, plus the ids generation needs to know.
pub struct GgufTokenizer {
    inner: tokenizers::Tokenizer,
    /// End-of-sequence id(s): generation stops on any of these.
    pub eos_ids: Vec<u32>,
    /// Beginning-of-sequence id, prepended when the model asks for it.
    pub bos_id: Option<u32>,
    /// Whether the model expects a BOS token before the prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    tokens: Vec<String>,
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported {
                model: model.to_owned(),
                pre: pre.to_owned(),
            });
        }
        let tokens: Vec<String> = gguf
            .strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
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
        let byte_level = ByteLevel::new(false, false, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // SmolLM and several others split digits one by one before the GPT-2 regex.
            "smollm" | "qwen2" | "deepseek-r1-qwen" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let types = gguf
            .integers("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| SPECIAL_TOKEN_TYPES.contains(t))
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
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
        let bos_id = gguf.u32_opt("tokenizer.ggml.bos_token_id");
        let add_bos = gguf
            .value("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            inner,
            eos_ids,
            bos_id,
            add_bos,
            tokens,
        })
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token string of an id, as stored in the GGUF file.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}
