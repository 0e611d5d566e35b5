//! Rate limiting per real client address (the TCP peer), with `governor`'s keyed GCRA limiter.
//!
//! Every route of the public API is behind it, so one address cannot exhaust the challenge table
//! or the join path. The key is the TCP peer address: a reverse proxy in front of the server
//! would make all clients one key (no `X-Forwarded-For` support, on purpose: it is spoofable
//! unless the proxy is trusted, and there is no such setting yet).

use std::net::IpAddr;
use std::num::NonZeroU32;

use actix_web::ResponseError;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::{ApiError, ApiState};

/// Addresses tracked before idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;

/// A per-address limiter; `None` inside means unlimited.
pub struct Limiter {
    inner: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Limiter {
    /// `per_sec` requests per second per address, bursts of `burst`; `per_sec == 0` disables.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let inner = NonZeroU32::new(per_sec).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Limiter { inner }
    }

    pub fn unlimited() -> Self {
        Limiter { inner: None }
    }

    /// True if `ip` may make one more request now.
    pub fn check(&self, ip: IpAddr) -> bool {
        let Some(l) = &self.inner else { return true };
        if l.len() > MAX_TRACKED {
            l.retain_recent();
        }
        l.check_key(&ip).is_ok()
    }
}

/// The middleware: 429 with the usual JSON error body when the peer is over its rate.
pub async fn limit(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let allowed = match (req.app_data::<web::Data<ApiState>>(), req.peer_addr()) {
        (Some(state), Some(peer)) => state.limiter.check(peer.ip()),
        _ => true,
    };
    if !allowed {
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this address; slow down",
        );
        return Ok(req.into_response(e.error_response()).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_burst() {
        let l = Limiter::new(1, 2);
        let (a, b): (IpAddr, IpAddr) = (
            "192.0.2.1".parse().expect("a"),
            "192.0.2.2".parse().expect("b"),
        );
        assert!(l.check(a) && l.check(a));
        assert!(!l.check(a), "burst of 2 used up");
        assert!(l.check(b), "another address is not affected");
        let off = Limiter::new(0, 0);
        assert!((0..1000).all(|_| off.check(a)));
    }
}
