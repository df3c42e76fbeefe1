//! Stop strings over streamed text.
//!
//! Text is released to the client only when it can no longer turn out to be the start of a stop
//! string: a suffix that is a prefix of some stop string is held back until the next token
//! settles it. When a stop string appears, the text before it is released and the rest dropped
//! (OpenAI semantics: the stop string is not part of the output).
//!
//! The work per token is bounded by the stop strings' lengths, not by the output's: the held
//! text is always shorter than the longest stop string (plus the new delta), and a new match
//! can only end inside the new delta, so only that window is searched.

use std::sync::Arc;

#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    /// Shared with the other choices of the same call.
    stops: Arc<[String]>,
    /// Length in bytes of the longest stop string.
    longest: usize,
    /// Text received but not yet released.
    held: String,
}

pub enum StopScan {
    /// Release this text; keep going.
    Continue(String),
    /// A stop string matched: release this text and finish.
    Stopped(String),
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Arc<[String]>) -> Self {
        let stops: Arc<[String]> = if stops.iter().any(String::is_empty) {
            stops.iter().filter(|s| !s.is_empty()).cloned().collect()
        } else {
            stops
        };
        Self {
            longest: stops.iter().map(String::len).max().unwrap_or(0),
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopScan {
        let before = self.held.len();
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return StopScan::Continue(std::mem::take(&mut self.held));
        }
        // The held text before this delta contained no stop string, so a match must end inside
        // the delta: search from `longest - 1` bytes before it.
        let window = floor_char_boundary(&self.held, before.saturating_sub(self.longest - 1));
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held[window..].find(s.as_str()))
            .min()
        {
            let out = self.held[..window + pos].to_string();
            self.held.clear();
            return StopScan::Stopped(out);
        }
        // Hold back the longest suffix that could still grow into a stop string: it is shorter
        // than the longest stop string.
        let first =
            floor_char_boundary(&self.held, self.held.len().saturating_sub(self.longest - 1));
        let mut keep_from = self.held.len();
        for (i, _) in self.held[first..].char_indices() {
            let tail = &self.held[first + i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = first + i;
                break;
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopScan::Continue(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopScan::Continue(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_deltas_is_cut() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run(&["END"], &["an E", "ND"]), ("an ".into(), true));
        assert_eq!(run(&["END"], &["an E", "x"]), ("an Ex".into(), false));
    }

    #[test]
    fn earliest_stop_wins_and_no_stops_passes_through() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn held_text_never_leaks_a_stop() {
        let mut m = StopMatcher::new(vec!["\n\n".to_string()].into());
        match m.push("line\n") {
            StopScan::Continue(t) => assert_eq!(t, "line"),
            StopScan::Stopped(_) => panic!(),
        }
        assert!(matches!(m.push("\n"), StopScan::Stopped(t) if t.is_empty()));
    }

    /// Against a naive reference (search the whole output so far) on random streams over a
    /// small alphabet, including multi-byte characters: the windowed search finds the same
    /// stop at the same place and releases the same text.
    #[test]
    fn windowed_search_equals_a_full_rescan() {
        let alphabet = ["a", "b", "é", "ab", "ba", ""];
        let mut state = 12345u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        let mut checked = 0;
        for _ in 0..2000 {
            let stops: Vec<String> = (0..1 + next(3))
                .map(|_| (0..1 + next(4)).map(|_| alphabet[next(3)]).collect())
                .collect();
            let deltas: Vec<&str> = (0..next(12))
                .map(|_| alphabet[next(alphabet.len())])
                .collect();
            let refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let got = run(&refs, &deltas);
            // Reference: after each delta, the earliest occurrence of any stop in the whole
            // text so far (the old full rescan).
            let mut text = String::new();
            let mut want = None;
            for d in &deltas {
                text.push_str(d);
                if let Some(pos) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                    want = Some((text[..pos].to_string(), true));
                    break;
                }
            }
            let want = want.unwrap_or((text, false));
            assert_eq!(got, want, "stops {stops:?} deltas {deltas:?}");
            checked += 1;
        }
        assert_eq!(checked, 2000);
    }
}
