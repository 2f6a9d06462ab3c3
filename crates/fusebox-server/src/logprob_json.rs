//! Log-probabilities in OpenAI's shapes: `logprobs.content` of a chat
//! answer, and the legacy `logprobs` of a completion. Tokens are shown as
//! their text (special tokens included) with their UTF-8 bytes; a token
//! that holds part of a character shows U+FFFD in its text and its own
//! bytes in `bytes`.

use std::sync::Arc;

use fusebox_models::Tokenizer;
use serde_json::{Map, Value};

use crate::openai::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};
use crate::output::Scored;

/// The floor OpenAI and vLLM report for an impossible token.
const FLOOR: f32 = -9999.0;

/// Formats scores with the model's tokenizer.
#[derive(Clone)]
pub struct Formatter {
    pub tokenizer: Arc<Tokenizer>,
}

impl Formatter {
    /// A chat answer's (or chunk's) `logprobs`.
    pub fn chat(&self, scored: &[Scored]) -> ChatLogprobs {
        let content = scored
            .iter()
            .map(|s| {
                let (token, bytes) = self.piece(s.id);
                let top_logprobs = s
                    .logprobs
                    .top
                    .iter()
                    .map(|&(id, lp)| {
                        let (token, bytes) = self.piece(id);
                        TopLogprob { token, logprob: floor(lp), bytes }
                    })
                    .collect();
                ChatTokenLogprob { token, logprob: floor(s.logprobs.logprob), bytes, top_logprobs }
            })
            .collect();
        ChatLogprobs { content }
    }

    /// A completion's (or chunk's) `logprobs`.
    pub fn completion(&self, scored: &[Scored]) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for s in scored {
            out.tokens.push(self.piece(s.id).0);
            out.token_logprobs.push(floor(s.logprobs.logprob));
            let mut top = Map::new();
            for &(id, lp) in &s.logprobs.top {
                top.entry(self.piece(id).0).or_insert_with(|| json_f32(floor(lp)));
            }
            out.top_logprobs.push(top);
            out.text_offset.push(s.text_offset);
        }
        out
    }

    /// A token's text and bytes.
    fn piece(&self, id: u32) -> (String, Vec<u8>) {
        let text = self.tokenizer.decode(&[id], false).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            let bytes = text.as_bytes().to_vec();
            return (text, bytes);
        }
        let raw = self.tokenizer.id_to_token(id).and_then(|t| raw_bytes(&t));
        let bytes = raw.unwrap_or_else(|| text.as_bytes().to_vec());
        (text, bytes)
    }
}

fn floor(lp: f32) -> f32 {
    if lp.is_nan() {
        FLOOR
    } else {
        lp.max(FLOOR)
    }
}

/// `v` as a JSON number with the digits of its shortest `f32` form.
fn json_f32(v: f32) -> Value {
    v.to_string().parse::<f64>().map(Value::from).unwrap_or(Value::Null)
}

/// The bytes behind a vocabulary entry that decodes to part of a character:
/// a byte-fallback token (`<0xE4>`) or a byte-level BPE token (GPT-2's byte
/// alphabet: printable bytes as themselves, the others from U+0100 on).
fn raw_bytes(token: &str) -> Option<Vec<u8>> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
    }
    token.chars().map(byte_level).collect()
}

/// The byte a character of GPT-2's byte-level alphabet stands for.
fn byte_level(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if printable(c) {
        return Some(c as u8);
    }
    let n = c.checked_sub(0x100)?;
    (0..=255u32).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_of_partial_characters() {
        assert_eq!(raw_bytes("<0xE4>"), Some(vec![0xe4]));
        // "é" is C3 A9: byte-level shows them as "Ã" and "©"
        assert_eq!(raw_bytes("Ã©"), Some(vec![0xc3, 0xa9]));
        // a space is "Ġ" (U+0120), the 33rd byte outside the printable ranges
        assert_eq!(raw_bytes("Ġa"), Some(vec![b' ', b'a']));
        assert_eq!(byte_level('\u{100}'), Some(0));
        assert_eq!(byte_level('\u{2581}'), None);
        assert_eq!(floor(f32::NEG_INFINITY), FLOOR);
        assert_eq!(floor(f32::NAN), FLOOR);
        assert_eq!(json_f32(-0.1).to_string(), "-0.1");
    }
}
