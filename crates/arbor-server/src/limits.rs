//! The per-call bounds a generation request must meet before it is queued (context, sequences,
//! prompt text and tokens), and the engine requests one call becomes.

use arbor_engine::Request;

use crate::api::Generation;
use crate::error::ApiError;
use crate::AppState;

/// Checks that a prompt fits the context with its max_tokens; returns the max_tokens to use
/// (all the context leaves when the request sets none).
pub(crate) fn fit_context(
    st: &AppState,
    prompt_len: usize,
    gen: &Generation,
) -> Result<usize, ApiError> {
    let context = st.context;
    if prompt_len == 0 {
        return Err(ApiError::invalid_param("prompt", "The prompt is empty."));
    }
    if prompt_len >= context {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "This model's maximum context length is {context} tokens. However, the prompt has {prompt_len} tokens, which leaves no room for a completion. Shorten the prompt."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match gen.max_tokens {
        None => Ok(context - prompt_len),
        Some(m) if prompt_len + m > context => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {m} for the completion). Reduce the prompt or max_tokens.",
                prompt_len + m
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
    }
}

/// The per-call bound on sequences (prompts x n), checked before any prompt is tokenized or
/// any engine request built.
pub(crate) fn check_sequences(st: &AppState, prompts: usize, n: usize) -> Result<(), ApiError> {
    let limit = st.limits.max_sequences_per_request;
    if prompts.saturating_mul(n) > limit {
        let (param, what) = if prompts > 1 {
            ("prompt", format!("{prompts} prompts x n = {n}"))
        } else {
            ("n", format!("n = {n}"))
        };
        return Err(ApiError::invalid_param(
            param,
            format!(
                "This request asks for {} sequences ({what}); the limit per request is {limit} (--max-seqs-per-request).",
                prompts.saturating_mul(n)
            ),
        ));
    }
    Ok(())
}

/// Text too long to fit the per-call token bound whatever it tokenizes to: refused before the
/// tokenizer spends seconds on it.
pub(crate) fn check_text_bytes(st: &AppState, bytes: usize, param: &str) -> Result<(), ApiError> {
    let limit = st.limits.max_prompt_text_bytes;
    if bytes > limit {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "The prompt text is {bytes} bytes long, more than {limit} bytes: it cannot fit the {} prompt tokens allowed per request.",
                st.limits.max_prompt_tokens_per_request
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// The per-call bound on prompt tokens (all prompts of the call together; `n` choices share
/// their prompt's KV): never more than the KV pool holds.
pub(crate) fn check_prompt_tokens(
    st: &AppState,
    prompts: &[Vec<u32>],
    param: &str,
) -> Result<(), ApiError> {
    let total: usize = prompts.iter().map(Vec::len).sum();
    let limit = st.limits.max_prompt_tokens_per_request;
    if total > limit {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "The prompts of this request have {total} tokens in all; the limit per request is {limit} (the KV pool's size, or --max-prompt-tokens-per-request)."
            ),
        ));
    }
    Ok(())
}

/// One engine request per (prompt, choice); choice `i` of a seeded request uses seed + i so
/// the choices differ but replay identically. The sampling and stop parameters' lists are
/// shared between the choices (reference-counted), not copied.
pub(crate) fn engine_requests(
    st: &AppState,
    prompts: &[Vec<u32>],
    gen: &Generation,
    logprobs: Option<usize>,
    namespace: u64,
) -> Result<Vec<Request>, ApiError> {
    let mut out = Vec::with_capacity(prompts.len() * gen.n);
    for prompt in prompts {
        let max_tokens = fit_context(st, prompt.len(), gen)?;
        for i in 0..gen.n {
            let mut sampling = gen.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let mut stop = gen.stop.clone();
            stop.max_tokens = max_tokens;
            out.push(Request {
                prompt: prompt.clone(),
                namespace,
                sampling,
                stop,
                logprobs,
                constraint: gen.constraint.clone(),
            });
        }
    }
    Ok(out)
}
