//! API keys and prefix-cache namespaces.
//!
//! With `--api-key` set, every /v1 request must carry one of the keys, and each key gets its own
//! cache namespace: the engine never matches a prompt against another namespace's tree, so a
//! tenant can neither reuse nor time (through a fast first token) another tenant's cached
//! prompt. The namespace is a keyed hash (SipHash with a key drawn at start) of the API key
//! and the optional `cache_salt`: clients cannot choose a namespace, only narrow their own.

use std::hash::{BuildHasher, Hash, Hasher};

use arbor_cache::Namespace;
use axum::http::HeaderMap;

use crate::error::ApiError;

pub struct Tenancy {
    keys: Vec<String>,
    hasher: std::collections::hash_map::RandomState,
}

/// API keys as given on the command line or in `ARBOR_API_KEYS` (comma-separated): each is
/// trimmed of white space; an empty one (a stray comma, a blank variable) is an error, since
/// silently dropping it could leave a server open that its operator meant to protect.
pub fn parse_api_keys(raw: &[String]) -> Result<Vec<String>, String> {
    raw.iter()
        .enumerate()
        .map(|(i, k)| {
            let k = k.trim();
            if k.is_empty() {
                Err(format!(
                    "API key #{} is empty: check --api-key / ARBOR_API_KEYS for a stray comma or blank value",
                    i + 1
                ))
            } else {
                Ok(k.to_string())
            }
        })
        .collect()
}

/// Who is calling, as the authentication middleware (`routes::require_key`) established it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The API key presented (`None` when the server has none).
    pub key: Option<std::sync::Arc<str>>,
}

impl Tenancy {
    /// `keys` as [`parse_api_keys`] returns them (trimmed, none empty).
    pub fn new(keys: Vec<String>) -> Self {
        Self {
            keys: keys
                .into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn requires_key(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The caller's API key, checked against the configured ones (`None` when the server has
    /// none).
    pub fn authenticate<'a>(&'a self, headers: &HeaderMap) -> Result<Option<&'a str>, ApiError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        self.keys
            .iter()
            .find(|k| constant_time_eq(k.as_bytes(), given.as_bytes()))
            .map(|k| Some(k.as_str()))
            .ok_or_else(ApiError::unauthorized)
    }

    /// The cache namespace of a request: 0 for an anonymous request without a salt, else a
    /// keyed hash of (key, salt).
    pub fn namespace(&self, key: Option<&str>, cache_salt: Option<&str>) -> Namespace {
        if key.is_none() && cache_salt.is_none() {
            return 0;
        }
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        cache_salt.hash(&mut h);
        // 0 is the anonymous namespace: keep it out of reach of hashed ones.
        h.finish().max(1)
    }
}

/// Compares without an early exit, so response time does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn keys_are_checked_and_give_separate_namespaces() {
        let t = Tenancy::new(vec!["alpha".into(), "beta".into()]);
        assert!(t.authenticate(&HeaderMap::new()).is_err());
        assert!(t.authenticate(&bearer("gamma")).is_err());
        assert!(t.authenticate(&bearer("alph")).is_err());
        let a = t.authenticate(&bearer("alpha")).unwrap();
        let b = t.authenticate(&bearer("beta")).unwrap();
        let (na, nb) = (t.namespace(a, None), t.namespace(b, None));
        assert_ne!(na, nb);
        assert_ne!(na, 0);
        assert_eq!(na, t.namespace(a, None), "stable for a key");
        assert_ne!(
            na,
            t.namespace(a, Some("s")),
            "a salt narrows the namespace"
        );
        assert_ne!(t.namespace(a, Some("s")), t.namespace(b, Some("s")));
    }

    #[test]
    fn keys_are_trimmed_and_an_empty_key_is_an_error() {
        let raw = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_api_keys(&raw(&[" alpha", "beta \n"])).unwrap(),
            vec!["alpha".to_string(), "beta".to_string()]
        );
        for bad in [&["alpha", ""][..], &["  "], &["a", "\t"]] {
            let e = parse_api_keys(&raw(bad)).unwrap_err();
            assert!(e.contains("empty"), "{e}");
        }
    }

    #[test]
    fn without_keys_everyone_shares_namespace_zero_unless_salted() {
        let t = Tenancy::new(vec![]);
        assert_eq!(t.authenticate(&HeaderMap::new()).unwrap(), None);
        assert_eq!(t.namespace(None, None), 0);
        assert_ne!(t.namespace(None, Some("x")), 0);
    }
}
