//! The HTTP framework's complaints about clients, kept out of the error log.
//!
//! actix-http answers what it cannot parse (a malformed request line or header, a broken
//! stream) itself, before any handler or middleware runs, and logs each at ERROR: anyone could
//! fill the log with one line per request. Those events are dropped from the normal output and
//! re-logged at DEBUG under [`TARGET`], at most one line per [`INTERVAL`], counting the rest.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// The target of the re-logged lines.
pub const TARGET: &str = "lemonade_nexus::api::http";
/// At most one re-logged line per this interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// True for a warning or error of the HTTP framework about one client's request or connection.
pub fn is_client_noise(meta: &Metadata<'_>) -> bool {
    meta.is_event() && *meta.level() <= Level::WARN && meta.target().starts_with("actix_http")
}

/// One event per interval; counts the ones it holds back (sans-IO: the caller passes `now`).
#[derive(Debug, Default)]
pub struct OnePer {
    last: Option<Instant>,
    suppressed: u64,
}

impl OnePer {
    /// `Some(n)`: log now, `n` events were held back since the last line. `None`: hold back.
    pub fn allow(&mut self, now: Instant, every: Duration) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The layer that re-logs [`is_client_noise`] events at DEBUG, rate-limited.
#[derive(Debug, Default)]
pub struct Demote {
    limit: Mutex<OnePer>,
}

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for Demote {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !is_client_noise(event.metadata()) {
            return;
        }
        let mut limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        let Some(suppressed) = limit.allow(Instant::now(), INTERVAL) else {
            return;
        };
        drop(limit);
        let mut msg = Message::default();
        event.record(&mut msg);
        tracing::debug!(target: TARGET, suppressed, "client request refused by the HTTP layer: {}", msg.0);
    }
}

/// The process's log subscriber: `filter` (an `EnvFilter` directive string) to stderr, with the
/// framework's per-client complaints demoted ([`Demote`]).
pub fn subscriber(filter: &str) -> impl Subscriber + Send + Sync + 'static {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter_fn(|m| !is_client_noise(m)));
    tracing_subscriber::registry()
        .with(EnvFilter::new(filter))
        .with(fmt)
        .with(Demote::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let mut l = OnePer::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(l.allow(t0, INTERVAL), Some(0));
        for i in 1..=5 {
            assert_eq!(l.allow(t0 + s * i, INTERVAL), None);
        }
        assert_eq!(l.allow(t0 + INTERVAL, INTERVAL), Some(5));
        assert_eq!(l.allow(t0 + INTERVAL + s, INTERVAL), None);
    }
}
