//! The event built from a verified webhook: what the store keeps and Motion will be asked for,
//! with the conversation (ordering) and dedup keys the provider's payload gives.
//!
//! Must never: read the body again (the caller parsed it once, into a [`Payload`]).

use crate::provider::{Payload, ProviderKind};
use crate::routing::AppTarget;
use crate::store::{NewEvent, Unowned, dedup_key};
use bytes::Bytes;
use http::{HeaderMap, Method};
use std::time::Duration;

/// What becomes one stored event.
pub struct Part<'a> {
    pub motion: &'a str,
    pub account: &'a str,
    pub kind: ProviderKind,
    pub method: Method,
    /// What to request on the Motion (below the relay's prefix).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// What the body says about itself (read by the caller, once).
    pub payload: &'a Payload,
    pub unowned: Option<Unowned>,
}

impl Part<'_> {
    /// The stored event: its conversation is the account, or the account and the customer the
    /// payload names; its dedup key the provider's event id, or a hash of the request.
    pub fn into_event(self, delivery_id: String, dedup_window: Duration, now_unix_ms: u64) -> NewEvent {
        NewEvent {
            delivery_id,
            motion: self.motion.to_string(),
            account: self.account.to_string(),
            dedup_key: Some(dedup_key(
                self.motion,
                self.account,
                self.payload.event_id.as_deref(),
                &[self.method.as_str().as_bytes(), self.path_and_query.as_bytes(), &self.body],
            )),
            conversation: match &self.payload.conversation {
                Some(c) => format!("{}\u{1f}{c}", self.account),
                None => self.account.to_string(),
            },
            provider: self.kind,
            method: self.method,
            path_and_query: self.path_and_query.to_string(),
            headers: self.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
            body: self.body,
            received_unix_ms: now_unix_ms,
            dedup_expires_unix_ms: now_unix_ms + dedup_window.as_millis() as u64,
            unowned: self.unowned,
        }
    }
}

/// The stored event for one account's part of a Meta app's batch: posted to the account's
/// notify path, as Meta would have posted it to a URL of the account's own.
pub fn app_part(
    t: &AppTarget,
    kind: ProviderKind,
    headers: &HeaderMap,
    body: Bytes,
    payload: &Payload,
    dedup_window: Duration,
    now_unix_ms: u64,
) -> NewEvent {
    let path = format!("/api/whatsapp/accounts/{}/notify", t.account.id);
    let part = Part {
        motion: &t.motion.motion.name,
        account: &t.account.id,
        kind,
        method: Method::POST,
        path_and_query: &path,
        headers,
        body,
        payload,
        unowned: None,
    };
    part.into_event(new_delivery_id(), dedup_window, now_unix_ms)
}

/// A new `X-Relay-Delivery` id: time-ordered, so ids sort roughly by acceptance.
pub fn new_delivery_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
