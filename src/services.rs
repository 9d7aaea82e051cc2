//! What the pipelines share, built once at start: the routing snapshot (swapped whole by a
//! reload), the metrics, the pooled upstream client, the durable queue, the 24-hour window, the
//! outbound token cache and the clock. Handed to each pipeline and to the control (reload,
//! readiness); it knows nothing of listeners or requests.

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider::sinch::oauth::SinchTokens;
use crate::queue::{DeliveryContext, Queue};
use crate::routing::{Snapshot, Snapshots};
use crate::store::{StoreError, Stores};
use crate::upstream::{Upstream, UpstreamError};
use crate::window::Window;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("cannot read the queue: {0}")]
    Store(#[from] StoreError),
}

pub struct Services {
    pub snapshots: Arc<Snapshots>,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    /// The durable queue, resumed from the store at start.
    pub queue: Arc<Queue>,
    /// The 24-hour customer service window (recorded inbound, checked outbound).
    pub window: Window,
    /// OAuth2 tokens for outbound sends, kept across reloads.
    pub tokens: SinchTokens,
    pub clock: Arc<dyn Clock>,
}

impl Services {
    /// Builds the first snapshot from `config` and resumes the queue over `stores`. Its
    /// background tasks (schedulers, window writer) run on the current runtime.
    pub fn start(config: Config, stores: Stores, clock: Arc<dyn Clock>) -> Result<Arc<Services>, StartError> {
        let upstream = Upstream::new();
        let snapshots = Arc::new(Snapshots::from_pointee(Snapshot::build(config, &upstream)?));
        let metrics = Arc::new(Metrics::new());
        let ctx = DeliveryContext { snapshots: snapshots.clone(), metrics: metrics.clone(), clock: clock.clone() };
        let queue = Queue::start(Arc::new(ctx), stores.queue)?;
        let window = Window::start(clock.clone(), stores.window);
        Ok(Arc::new(Services { snapshots, metrics, upstream, queue, window, tokens: Default::default(), clock }))
    }

    /// The current snapshot: what one request sees from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load_full()
    }

    /// A webhook answered 2xx for this Motion's account (what the board counts as "in").
    pub fn count_accepted(&self, motion: &str, account: &crate::config::Account) {
        let labels = crate::metrics::MotionLabels { motion: motion.to_string() };
        self.metrics.webhooks_accepted.get_or_create(&labels).inc();
        account.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Milliseconds since the Unix epoch, by the relay's clock.
    pub fn now_unix_ms(&self) -> u64 {
        self.clock.now_unix_ms()
    }
}
