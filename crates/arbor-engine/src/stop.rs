//! Stop strings over streamed text.
//!
//! Text is released to the client only when it can no longer turn out to be the start of a stop
//! string: a suffix that is a prefix of some stop string is held back until the next token
//! settles it. When a stop string appears, the text before it is released and the rest dropped
//! (OpenAI semantics: the stop string is not part of the output).

#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
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
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopScan {
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return StopScan::Continue(std::mem::take(&mut self.held));
        }
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return StopScan::Stopped(out);
        }
        // Hold back the longest suffix that could still grow into a stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices() {
            let tail = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
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
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        match m.push("line\n") {
            StopScan::Continue(t) => assert_eq!(t, "line"),
            StopScan::Stopped(_) => panic!(),
        }
        assert!(matches!(m.push("\n"), StopScan::Stopped(t) if t.is_empty()));
    }
}
