//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and the
//! incremental detokenizer used for streaming.

use std::path::Path;

use anyhow::{anyhow, Result};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.exists() {
            return Err(anyhow!("{}: not found (a model directory needs tokenizer.json)", path.display()));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Tokenizer { inner })
    }

    /// Wrap an already-built tokenizer (e.g. one assembled from GGUF metadata).
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Tokenizer {
        Tokenizer { inner }
    }

    /// Token ids of `text`. `add_special` adds what the tokenizer's
    /// post-processor adds (e.g. a BOS token); chat-templated text already
    /// carries its special tokens and is encoded without.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Decoding one token at a time is wrong for byte-level BPE (a character may
/// span tokens) and for SentencePiece (leading spaces depend on context), so
/// each step decodes a short window of recent tokens and emits only the text
/// beyond what the window's prefix already produced, holding back anything
/// that ends in an incomplete UTF-8 sequence.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token; returns newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end of generation.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok((now.len() > before.len() && now.is_char_boundary(before.len())).then(|| now[before.len()..].to_string()))
    }
}
