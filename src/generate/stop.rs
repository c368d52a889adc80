//! Stop strings over streamed text: finds the first complete stop string, and otherwise how much of
//! the text's end must be held back because it could still grow into one.

/// Text not yet released to the caller, checked against the stop strings as it grows.
///
/// Everything released before contains no stop string and no start of one that later text could
/// complete, so a match can only begin inside the pending text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Text that is final; the rest stays pending.
    Text(String),
    /// A stop string was completed: the text before it, which ends the output.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops` (each non-empty).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.to_vec(),
            pending: String::new(),
        }
    }

    /// Adds `piece`. With `last`, the text ends here: everything up to a stop string (or all of it)
    /// is released.
    pub fn push(&mut self, piece: &str, last: bool) -> Release {
        self.pending.push_str(piece);
        if let Some(at) = self.first_stop() {
            let before = self.pending.get(..at).unwrap_or_default().to_string();
            self.pending.clear();
            return Release::Stop(before);
        }
        let keep = if last { 0 } else { self.held_len() };
        let split = self.pending.len() - keep;
        let rest = self.pending.split_off(split);
        Release::Text(std::mem::replace(&mut self.pending, rest))
    }

    /// Byte offset of the earliest stop string in the pending text.
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min()
    }

    /// Length of the longest end of the pending text that is a proper prefix of some stop string.
    fn held_len(&self) -> usize {
        let mut held = 0;
        for stop in &self.stops {
            for k in (held + 1..stop.len()).rev() {
                if let Some(prefix) = stop.get(..k) {
                    if self.pending.ends_with(prefix) {
                        held = k;
                        break;
                    }
                }
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopMatcher::new(&stops)
    }

    #[test]
    fn holds_back_a_possible_start_and_releases_it_when_it_diverges() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("abcE", false), Release::Text("abc".into()));
        assert_eq!(m.push("N", false), Release::Text("".into()));
        assert_eq!(m.push("x", false), Release::Text("ENx".into()));
    }

    #[test]
    fn stop_split_across_pieces_ends_the_text_before_it() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("one E", false), Release::Text("one ".into()));
        assert_eq!(m.push("NDtwo", false), Release::Stop("".into()));
        let mut m = matcher(&["xyz", "b"]);
        assert_eq!(m.push("axyzb", false), Release::Stop("a".into()));
    }

    #[test]
    fn last_piece_releases_what_was_held() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("go ST", false), Release::Text("go ".into()));
        assert_eq!(m.push("O", true), Release::Text("STO".into()));
    }

    #[test]
    fn multibyte_prefixes_split_on_char_boundaries() {
        let mut m = matcher(&["éé!"]);
        assert_eq!(m.push("aé", false), Release::Text("a".into()));
        assert_eq!(m.push("é", false), Release::Text("".into()));
        assert_eq!(m.push("!", false), Release::Stop("".into()));
    }
}
