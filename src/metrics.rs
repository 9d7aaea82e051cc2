//! Prometheus metrics (prometheus-client). Every series the relay exports is registered here,
//! so `/metrics` is the one place an operator's dashboards depend on.

use crate::provider::ProviderKind;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub motion: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MotionLabels {
    pub motion: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: String,
}

/// A closed set of label values: an enum whose variants print as the given strings.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

/// A provider as a label value: its config name.
impl EncodeLabelValue for ProviderKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    pub provider: ProviderKind,
    /// A [`crate::provider::Rejection`]'s reason.
    pub reason: &'static str,
}

label_values! {
    /// What one delivery attempt came to.
    DeliveryOutcome { Delivered => "delivered", Retry => "retry", Dead => "dead" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub motion: String,
    pub outcome: DeliveryOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLabels {
    pub motion: String,
    /// [`crate::store::DeadReason::label`]: refused, gave_up, no_account, recorded.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub motion: String,
    pub provider: ProviderKind,
    pub status: u16,
}

label_values! {
    /// What the relay did with a free-form send outside the 24-hour window.
    WindowAction {
        /// Policy `warn`: sent, with `X-Relay-Window: closed`.
        Warned => "warned",
        /// Policy `enforce`: 422.
        Refused => "refused",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabels {
    pub motion: String,
    pub provider: ProviderKind,
    pub action: WindowAction,
}

label_values! {
    /// How a configuration reload ended.
    ReloadResult { Ok => "ok", Refused => "refused" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: ReloadResult,
}

label_values! {
    /// Where the https listener's certificate comes from.
    CertSourceLabel { Files => "files", Acme => "acme" }
}

label_values! {
    /// How loading a certificate went.
    CertResult { Ok => "ok", Refused => "refused", Error => "error" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub source: CertSourceLabel,
    pub result: CertResult,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s: covers a direct proxy hop and a slow Motion.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<MotionLabels, Histogram>,
    pub verify_failures: Family<VerifyLabels, Counter>,
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub retries: Family<MotionLabels, Counter>,
    pub queue_depth: Family<MotionLabels, Gauge>,
    pub queue_oldest_seconds: Family<MotionLabels, Gauge>,
    pub ack_latency: Family<MotionLabels, Histogram>,
    pub dead_letters: Family<DeadLabels, Counter>,
    pub dedup_hits: Family<MotionLabels, Counter>,
    pub rate_limited: Family<MotionLabels, Counter>,
    pub replays: Family<MotionLabels, Counter>,
    pub unknown_numbers: Family<AppLabels, Counter>,
    pub outbound_requests: Family<OutboundLabels, Counter>,
    pub window_closed: Family<WindowLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub config_reload_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub cert_loads: Family<CertLabels, Counter>,
    pub cert_expiry: Gauge,
    pub acme_failing: Gauge,
    pub webhooks_accepted: Family<MotionLabels, Counter>,
    pub outbound_classes: Family<ClassLabels, Counter>,
    pub store_size: Gauge,
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub accept_errors: Family<ListenerLabels, Counter>,
}

label_values! {
    /// An HTTP status by its first digit.
    StatusClass { Success => "2xx", Redirect => "3xx", ClientError => "4xx", ServerError => "5xx", Other => "other" }
}

impl StatusClass {
    pub fn of(status: u16) -> StatusClass {
        match status {
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirect,
            400..=499 => StatusClass::ClientError,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::Other,
        }
    }
}

label_values! {
    /// Why a connection was closed right after `accept`.
    RefusedReason { Listener => "max_connections", Source => "max_connections_per_ip" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    pub reason: RefusedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub motion: String,
    pub class: StatusClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

/// One Motion's counters since the relay started, as the board shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MotionTotals {
    pub received: u64,
    pub delivered: u64,
    pub retries: u64,
    pub dead_letters: u64,
    pub rate_limited: u64,
    pub outbound_2xx: u64,
    pub outbound_4xx: u64,
    pub outbound_5xx: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("whatsapp_relay");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<MotionLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let verify_failures = Family::<VerifyLabels, Counter>::default();
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        let retries = Family::<MotionLabels, Counter>::default();
        let queue_depth = Family::<MotionLabels, Gauge>::default();
        let queue_oldest_seconds = Family::<MotionLabels, Gauge>::default();
        let ack_latency =
            Family::<MotionLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let dead_letters = Family::<DeadLabels, Counter>::default();
        let dedup_hits = Family::<MotionLabels, Counter>::default();
        let rate_limited = Family::<MotionLabels, Counter>::default();
        let replays = Family::<MotionLabels, Counter>::default();
        let unknown_numbers = Family::<AppLabels, Counter>::default();
        let outbound_requests = Family::<OutboundLabels, Counter>::default();
        let window_closed = Family::<WindowLabels, Counter>::default();
        registry.register("requests", "Requests answered, by motion and status", requests.clone());
        registry.register("request_duration_seconds", "Time to answer a request, by motion", latency.clone());
        registry.register(
            "verification_failures",
            "Webhooks refused by verification, by provider and reason",
            verify_failures.clone(),
        );
        registry.register("deliveries", "Delivery attempts to Motion servers, by outcome", deliveries.clone());
        registry.register("retries", "Delivery retries scheduled, by motion", retries.clone());
        registry.register("queue_depth", "Events waiting for a Motion server", queue_depth.clone());
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest waiting event, by motion",
            queue_oldest_seconds.clone(),
        );
        registry.register(
            "ack_duration_seconds",
            "Time from request to durable acknowledgement, by motion",
            ack_latency.clone(),
        );
        registry.register(
            "dead_letters",
            "Events moved to the dead letters, by motion and reason",
            dead_letters.clone(),
        );
        registry.register("dedup_hits", "Provider redeliveries acknowledged and not stored again", dedup_hits.clone());
        registry.register(
            "rate_limited",
            "Webhooks refused with 429 because their Motion's rate_limit was reached, by motion",
            rate_limited.clone(),
        );
        registry.register("replays", "Dead letters sent again by an operator", replays.clone());
        registry.register(
            "meta_unknown_numbers",
            "Meta app batches with changes for a number no account claims (kept as dead letters)",
            unknown_numbers.clone(),
        );
        registry.register(
            "outbound_requests",
            "Outbound sends answered, by motion, provider and status (the provider's, or the relay's refusal)",
            outbound_requests.clone(),
        );
        registry.register(
            "outbound_window_closed",
            "Free-form sends outside the 24-hour customer service window, by motion, provider and action",
            window_closed.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        let config_reload_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let cert_loads = Family::<CertLabels, Counter>::default();
        let cert_expiry = Gauge::default();
        let acme_failing = Gauge::default();
        let webhooks_accepted = Family::<MotionLabels, Counter>::default();
        let outbound_classes = Family::<ClassLabels, Counter>::default();
        let store_size = Gauge::default();
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_open",
            "Open connections, by listener (http, https, admin)",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed right after accept, past max_connections or max_connections_per_ip, by listener and reason",
            connections_refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (such as out of file descriptors), by listener",
            accept_errors.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "1, labelled with the relay's version", build_info);
        registry.register(
            "webhooks_accepted",
            "Webhooks answered 2xx for a Motion (stored, or taken by Motion in direct mode), by motion",
            webhooks_accepted.clone(),
        );
        registry.register(
            "outbound_sends",
            "Outbound sends answered, by motion and status class (2xx, 4xx, 5xx: the provider's, or the relay's refusal)",
            outbound_classes.clone(),
        );
        registry.register(
            "store_size_bytes",
            "Size of the durable store (the embedded store's file), sampled every few seconds",
            store_size.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP, POST /admin/reload), by result (ok, refused)",
            config_reloads.clone(),
        );
        registry.register(
            "config_reload_duration_seconds",
            "Time the last successful reload took to validate and build the routing table",
            config_reload_seconds.clone(),
        );
        registry.register(
            "tls_certificate_loads",
            "Certificates loaded for the https listener, by source (files, acme) and result (ok, refused, error)",
            cert_loads.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter, Unix time) of the certificate the https listener serves; 0 while there is none",
            cert_expiry.clone(),
        );
        registry.register(
            "acme_failing",
            "1 while the last ACME attempt (order, renewal or cache access) failed; the reason is in the log and /readyz",
            acme_failing.clone(),
        );
        Metrics {
            registry,
            unknown_numbers,
            dedup_hits,
            rate_limited,
            replays,
            config_reloads,
            config_reload_seconds,
            cert_loads,
            cert_expiry,
            acme_failing,
            webhooks_accepted,
            outbound_classes,
            store_size,
            connections_open,
            connections_refused,
            accept_errors,
            requests,
            latency,
            verify_failures,
            deliveries,
            retries,
            queue_depth,
            queue_oldest_seconds,
            ack_latency,
            dead_letters,
            outbound_requests,
            window_closed,
        }
    }

    /// One Motion's counters (read from the families above without creating a series: a
    /// series not seen yet reads 0 and stays absent from `/metrics`).
    pub fn motion_totals(&self, motion: &str) -> MotionTotals {
        fn read<S: Clone + std::hash::Hash + Eq>(f: &Family<S, Counter>, labels: S) -> u64 {
            f.get(&labels).map_or(0, |c| c.get())
        }
        let m = || MotionLabels { motion: motion.to_string() };
        let outcome = |outcome| read(&self.deliveries, OutcomeLabels { motion: motion.to_string(), outcome });
        let class = |class| read(&self.outbound_classes, ClassLabels { motion: motion.to_string(), class });
        let dead = crate::store::DeadReason::LABELS
            .into_iter()
            .map(|reason| read(&self.dead_letters, DeadLabels { motion: motion.to_string(), reason }))
            .sum();
        MotionTotals {
            received: read(&self.webhooks_accepted, m()),
            delivered: outcome(DeliveryOutcome::Delivered),
            retries: outcome(DeliveryOutcome::Retry),
            dead_letters: dead,
            rate_limited: read(&self.rate_limited, m()),
            outbound_2xx: class(StatusClass::Success),
            outbound_4xx: class(StatusClass::ClientError),
            outbound_5xx: class(StatusClass::ServerError),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
