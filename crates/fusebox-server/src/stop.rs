//! Stop strings over text that arrives in pieces: a match may span pieces,
//! the stop string itself is never emitted, and only the tail that could
//! still begin a stop string is held back.

/// What one piece of text gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Text that can be emitted now (possibly empty).
    Emit(String),
    /// A stop string matched: the text before it, the last to emit.
    Stop(String),
}

/// Finds the first of several stop strings in a stream of text pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not emitted yet: a suffix of everything pushed that is a proper
    /// prefix of some stop string.
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Add the next piece of text.
    pub fn push(&mut self, piece: &str) -> Step {
        if self.stops.is_empty() {
            return Step::Emit(piece.to_string());
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(piece);
        // The earliest match in `text` is the earliest in the whole stream:
        // a match that began in text already emitted would have begun in
        // what was held (see `held_from`).
        if let Some(at) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            return Step::Stop(text);
        }
        let keep = self.held_from(&text);
        self.held = text.split_off(keep);
        Step::Emit(text)
    }

    /// The end of the text: what was held back, since no stop string followed.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Where the longest suffix of `text` that is a proper prefix of a stop
    /// string starts (`text.len()` when there is none). A suffix that equals
    /// a stop string's prefix starts on a character boundary, since a stop
    /// string does not start inside a character.
    fn held_from(&self, text: &str) -> usize {
        let bytes = text.as_bytes();
        let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0).min(bytes.len());
        for start in bytes.len() - longest..bytes.len() {
            let tail = &bytes[start..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.as_bytes().starts_with(tail)) {
                return start;
            }
        }
        bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push `pieces` and return what was emitted, and whether a stop matched.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = vec![];
        for p in pieces {
            match m.push(p) {
                Step::Emit(t) => out.push(t),
                Step::Stop(t) => {
                    out.push(t);
                    return (out, true);
                }
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn no_stop_strings_pass_text_through() {
        assert_eq!(run(&[], &["ab", "", "c"]), (vec!["ab".into(), "".into(), "c".into(), "".into()], false));
    }

    #[test]
    fn a_match_split_across_pieces() {
        let (out, stopped) = run(&["STOP"], &["hello S", "T", "OP world"]);
        assert!(stopped);
        assert_eq!(out, ["hello ", "", ""].map(String::from));
        // a prefix that does not go on is emitted as soon as it fails
        let (out, stopped) = run(&["STOP"], &["a ST", "x", "b"]);
        assert!(!stopped);
        assert_eq!(out, ["a ", "STx", "b", ""].map(String::from));
    }

    #[test]
    fn only_a_possible_prefix_is_held() {
        let mut m = StopMatcher::new(vec!["</end>".into()]);
        assert_eq!(m.push("text </e"), Step::Emit("text ".into()));
        assert_eq!(m.push("nd"), Step::Emit("".into()));
        assert_eq!(m.push("!"), Step::Emit("</end!".into()));
        assert_eq!(m.push("<"), Step::Emit("".into()));
        assert_eq!(m.finish(), "<");
    }

    #[test]
    fn overlapping_prefixes() {
        // "aab" in "aaab": the first 'a' cannot start the match, the second can
        let (out, stopped) = run(&["aab"], &["a", "a", "a", "b", "c"]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
        let (out, stopped) = run(&["abab"], &["ab", "ab", "ab"]);
        assert!(stopped);
        assert_eq!(out.concat(), "");
        let (out, stopped) = run(&["abac"], &["aba", "bac"]);
        assert!(stopped);
        assert_eq!(out.concat(), "ab");
    }

    #[test]
    fn several_stop_strings_the_earliest_wins() {
        let (out, stopped) = run(&["world", "lo w"], &["hel", "lo wor", "ld"]);
        assert!(stopped);
        assert_eq!(out.concat(), "hel");
        // one stop string a prefix of another: the shorter matches first
        let (out, stopped) = run(&["ab", "abc"], &["xa", "bc"]);
        assert!(stopped);
        assert_eq!(out.concat(), "x");
        let (out, stopped) = run(&["x", "yz"], &["aby", "q"]);
        assert!(!stopped);
        assert_eq!(out, ["ab", "yq", ""].map(String::from));
    }

    #[test]
    fn multi_byte_characters() {
        let (out, stopped) = run(&["é!"], &["café", "é", "!", "rest"]);
        assert!(stopped);
        assert_eq!(out, ["caf", "é", ""].map(String::from));
        // a stop string sharing a first byte with text must not split a character
        let (out, stopped) = run(&["日本"], &["今日", "は日", "本"]);
        assert!(stopped);
        assert_eq!(out.concat(), "今日は");
        let (out, stopped) = run(&["é"], &["è", "ê"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "èê");
        let (out, stopped) = run(&["🦀x"], &["a🦀", "🦀", "x"]);
        assert!(stopped);
        assert_eq!(out, ["a", "🦀", ""].map(String::from));
    }

    #[test]
    fn a_stop_at_the_very_start() {
        let (out, stopped) = run(&["Hi"], &["Hi there"]);
        assert!(stopped);
        assert_eq!(out, [""].map(String::from));
        let (out, stopped) = run(&["Hi"], &["H", "i"]);
        assert!(stopped);
        assert_eq!(out.concat(), "");
    }

    #[test]
    fn the_held_tail_comes_out_at_the_end() {
        let (out, stopped) = run(&["END"], &["the E", "N"]);
        assert!(!stopped);
        assert_eq!(out, ["the ", "", "EN"].map(String::from));
    }
}
