//! Output processing: what a sampled token means for its request. The token (appended to the
//! sequence when its step was collected) is detokenized incrementally, checked against stop
//! tokens, stop strings and the length limit, and becomes an [`Event`]; a request that ends
//! gets its `Finished` event.

use std::time::Instant;

use arbor_model::{FaultInjector, FaultSite, TokenLogprob, Tokenizer};

use crate::request::{Event, FinishReason, Usage};
use crate::scheduler::Sequence;
use crate::stop::StopScan;

/// What happens to text a finishing request still holds back as a possible stop string.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flush {
    /// It is real output (a stop token, or the length limit, ended the request).
    Release,
    /// It is dropped (a stop string matched, or the request failed).
    Drop,
}

/// A sampled token already appended to its sequence: its event, and how the request ends
/// if it does.
pub(crate) fn advance_with_token(
    s: &mut Sequence,
    tokenizer: &Tokenizer,
    token: u32,
    logprob: Option<TokenLogprob>,
    faults: Option<&FaultInjector>,
) -> Result<(Event, Option<(FinishReason, Flush)>), String> {
    debug_assert_eq!(s.tokens.last(), Some(&token));
    if s.stop_set.binary_search(&token).is_ok() {
        let event = Event::Token {
            id: s.id,
            token,
            text: String::new(),
            logprob,
        };
        // Text held back as a possible stop-string start is real output now.
        return Ok((event, Some((FinishReason::Stop, Flush::Release))));
    }
    if let Some(f) = faults {
        (f.0)(FaultSite::Detokenize {
            prompt: &s.tokens[..s.prompt_len],
        });
    }
    let delta = s
        .decoder
        .push(tokenizer, token)
        .map_err(|e| format!("detokenizing token {token} failed: {e}"))?;
    let (text, end) = match s.matcher.push(&delta) {
        // Everything from the stop string on is dropped.
        StopScan::Stopped(text) => (text, Some((FinishReason::Stop, Flush::Drop))),
        StopScan::Continue(text) => {
            let end =
                (s.generated() >= s.max_new).then_some((FinishReason::Length, Flush::Release));
            (text, end)
        }
    };
    let event = Event::Token {
        id: s.id,
        token,
        text,
        logprob,
    };
    Ok((event, end))
}

/// The `Finished` event of a sequence whose KV is already released; `flush` says whether the
/// text held back as a possible stop string is output.
pub(crate) fn finished_event(
    mut seq: Sequence,
    reason: FinishReason,
    flush: Flush,
    error: Option<String>,
) -> Event {
    let text = match flush {
        Flush::Release => seq.matcher.flush(),
        Flush::Drop => String::new(),
    };
    seq.timing.finished_at = Some(Instant::now());
    Event::Finished {
        id: seq.id,
        reason,
        text,
        usage: Usage {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated(),
            cached_tokens: seq.reused,
        },
        timing: seq.timing,
        error,
    }
}
