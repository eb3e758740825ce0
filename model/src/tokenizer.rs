//! Text tokenization with a Hugging Face `tokenizer.json`, independent of libtorch so it can run
//! on any thread.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::ModelError;

/// Handling of a text that tokenizes to more than the maximum number of tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOverflow {
    /// Keep the first tokens and the closing special token.
    #[default]
    Truncate,
    /// Return [`ModelError::TooManyTokens`].
    Reject,
}

/// A tokenizer that encodes one text at a time, with the special tokens of its post-processor
/// (`[CLS]` and `[SEP]` for BERT) and a token limit.
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_tokens: usize,
    overflow: TokenOverflow,
    pad_id: i64,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`.
    ///
    /// The padding and truncation settings stored in the file are replaced: sequences are
    /// padded per batch by [`crate::pad_batch`], and `max_tokens` (special tokens included)
    /// either truncates or rejects longer texts. The padding id is the one in the file's
    /// padding settings, else the id of `[PAD]`, else 0.
    pub fn from_file(
        path: impl AsRef<Path>,
        max_tokens: usize,
        overflow: TokenOverflow,
    ) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let mut inner = Tokenizer::from_file(path).map_err(|error| {
            ModelError::Tokenizer(format!("failed to load {}: {error}", path.display()))
        })?;

        let special_tokens = inner
            .get_post_processor()
            .map_or(0, |processor| processor.added_tokens(false));
        if max_tokens <= special_tokens {
            return Err(ModelError::Tokenizer(format!(
                "max_tokens is {max_tokens}, but {} adds {special_tokens} special tokens to every text; \
                 set max_tokens to at least {}",
                path.display(),
                special_tokens + 1
            )));
        }

        let pad_id = match inner.get_padding() {
            Some(padding) => padding.pad_id,
            None => inner.token_to_id("[PAD]").unwrap_or(0),
        };
        inner.with_padding(None);
        let truncation = match overflow {
            TokenOverflow::Truncate => Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }),
            TokenOverflow::Reject => None,
        };
        inner.with_truncation(truncation).map_err(|error| {
            ModelError::Tokenizer(format!(
                "invalid truncation for {}: {error}",
                path.display()
            ))
        })?;

        Ok(Self {
            inner,
            max_tokens,
            overflow,
            pad_id: i64::from(pad_id),
            path: path.to_path_buf(),
        })
    }

    /// Encodes one text into token ids, special tokens included.
    ///
    /// Returns [`ModelError::TooManyTokens`] for a text longer than `max_tokens` when overflow
    /// is [`TokenOverflow::Reject`].
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|error| ModelError::Tokenizer(format!("failed to tokenize text: {error}")))?;
        let ids = encoding.get_ids();
        if ids.len() > self.max_tokens {
            return Err(ModelError::TooManyTokens {
                count: ids.len(),
                max_tokens: self.max_tokens,
            });
        }
        Ok(ids.iter().map(|&id| i64::from(id)).collect())
    }

    /// Id used to pad sequences.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Maximum number of tokens per text, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Handling of texts longer than `max_tokens`.
    pub fn overflow(&self) -> TokenOverflow {
        self.overflow
    }

    /// Number of tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Returns the path of the `tokenizer.json` the tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
