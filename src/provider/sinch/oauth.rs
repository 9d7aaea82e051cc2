//! Sinch OAuth2 access tokens (client credentials): fetched from the account's `auth_url` with
//! its `key_id`/`key_secret`, cached until shortly before they expire, and fetched again when
//! Sinch answers 401 to a token the cache still believed in.
//!
//! One fetch at a time per access key: concurrent sends wait for the same answer instead of
//! stampeding the token endpoint, a failed fetch is their answer for a few seconds, and no send
//! waits longer than `[outbound] timeout` in all. The cache lives on the relay, so reloads keep
//! it; its key includes a digest of the secret, so a rotated secret gets a fresh token.

use crate::http_util::error_chain;
use crate::upstream::Client;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tokens are refreshed this long before Sinch says they expire (at most half their life).
const MARGIN: Duration = Duration::from_secs(60);
/// Sinch documents one hour; used when the answer has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot reach the Sinch token endpoint {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the Sinch token endpoint {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("the Sinch token endpoint {url} answered {status}; check the account's key_id and key_secret")]
    Refused { url: String, status: u16 },
    #[error("the Sinch token endpoint {url} answered without a usable access_token")]
    BadAnswer { url: String },
}

struct Cached {
    token: String,
    fresh_until: Instant,
}

/// What one access key's slot holds: its token, and the last failed fetch, which the sends
/// queued behind it get at once instead of each fetching again.
#[derive(Default)]
struct State {
    cached: Option<Cached>,
    failed: Option<(Instant, TokenError)>,
}

/// How long a failed fetch is the answer before the next send tries again.
const FAILED_FOR: Duration = Duration::from_secs(5);

type Slot = Arc<tokio::sync::Mutex<State>>;

/// The cache, one slot per (auth_url, key_id, secret digest).
#[derive(Default)]
pub struct SinchTokens {
    slots: Mutex<HashMap<[u8; 32], Slot>>,
    fetches: std::sync::atomic::AtomicU64,
}

/// Where and with what to ask for a token.
pub struct KeyRef<'a> {
    pub auth_url: &'a str,
    pub key_id: &'a str,
    pub key_secret: &'a str,
}

/// When a token call must be over, and the timeout it was given (named in its error).
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    timeout: Duration,
}

impl SinchTokens {
    /// Tokens fetched since start (for tests and the debug log).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A valid token: the cached one, or a new one. `rejected` is a token the provider just
    /// answered 401 to: if the cache still holds it, it is fetched anew (once; a token fetched
    /// meanwhile by another request is used as it is).
    pub async fn get(
        &self,
        client: &Client,
        key: &KeyRef<'_>,
        timeout: Duration,
        rejected: Option<&str>,
    ) -> Result<String, TokenError> {
        // `timeout` bounds the whole call, the wait for another send's fetch included. A fetch
        // ends at the same instant, so it times out first (it is polled first) and records its
        // failure for the sends waiting behind it, instead of being cancelled unrecorded.
        let deadline = Deadline { at: tokio::time::Instant::now() + timeout, timeout };
        match tokio::time::timeout_at(deadline.at, self.get_within(client, key, deadline, rejected)).await {
            Ok(answer) => answer,
            Err(_) => Err(TokenError::Timeout { url: key.auth_url.to_string(), timeout }),
        }
    }

    async fn get_within(
        &self,
        client: &Client,
        key: &KeyRef<'_>,
        deadline: Deadline,
        rejected: Option<&str>,
    ) -> Result<String, TokenError> {
        let slot = self.slot(key);
        let mut state = slot.lock().await;
        if let Some(c) = state.cached.as_ref() {
            let stale = rejected.is_some_and(|r| r == c.token);
            if !stale && Instant::now() < c.fresh_until {
                return Ok(c.token.clone());
            }
        }
        if let Some((at, e)) = &state.failed {
            if at.elapsed() < FAILED_FOR {
                return Err(e.clone());
            }
        }
        state.cached = None;
        match self.fetch(client, key, deadline).await {
            Ok((token, lifetime)) => {
                self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let margin = MARGIN.min(lifetime / 2);
                state.failed = None;
                state.cached = Some(Cached { token: token.clone(), fresh_until: Instant::now() + lifetime - margin });
                Ok(token)
            }
            Err(e) => {
                state.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    fn slot(&self, key: &KeyRef<'_>) -> Slot {
        let mut h = Sha256::new();
        for part in [key.auth_url, key.key_id, key.key_secret] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let id: [u8; 32] = h.finalize().into();
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().clone()
    }

    async fn fetch(
        &self,
        client: &Client,
        key: &KeyRef<'_>,
        Deadline { at: deadline, timeout }: Deadline,
    ) -> Result<(String, Duration), TokenError> {
        let url = key.auth_url.to_string();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", key.key_id, key.key_secret));
        let req = Request::builder()
            .method(Method::POST)
            .uri(key.auth_url)
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from_static(b"grant_type=client_credentials")))
            .map_err(|e| TokenError::Unreachable { url: url.clone(), cause: e.to_string() })?;
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| TokenError::Unreachable { url: url.clone(), cause: error_chain(&e) })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| TokenError::Unreachable { url: url.clone(), cause: e.to_string() })?
                .to_bytes();
            Ok::<_, TokenError>((status, body))
        };
        let (status, body) = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| TokenError::Timeout { url: url.clone(), timeout })??;
        if !status.is_success() {
            return Err(TokenError::Refused { url, status: status.as_u16() });
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            access_token: String,
            expires_in: Option<u64>,
        }
        let a: Answer = serde_json::from_slice(&body).map_err(|_| TokenError::BadAnswer { url: url.clone() })?;
        if a.access_token.is_empty() {
            return Err(TokenError::BadAnswer { url });
        }
        // Capped at a day: an absurd `expires_in` must not overflow the clock (Sinch says 3600).
        let lifetime = a.expires_in.filter(|s| *s > 0).map_or(DEFAULT_LIFETIME, |s| Duration::from_secs(s.min(86_400)));
        tracing::debug!(auth_url = %url, lifetime_s = lifetime.as_secs(), "fetched a Sinch access token");
        Ok((a.access_token, lifetime))
    }
}
