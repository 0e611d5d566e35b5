//! Hybrid logical clocks (Kulkarni et al.): a timestamp that stays close to wall-clock time but
//! always moves forward, even when a server's clock steps back or a peer's clock runs ahead.
//!
//! Pure: the caller passes the current wall-clock time in milliseconds. Every op carries one HLC;
//! the fold orders ops by `(hlc, origin, seq)` (see `crate::op::fold_order`).

use serde::{Deserialize, Serialize};

/// The largest amount, in milliseconds, by which a remote clock may be ahead of ours before we
/// refuse its timestamp (default for [`Hlc::observe`] callers; configurable by the caller).
pub const DEFAULT_MAX_SKEW_MS: u64 = 60_000;

/// A hybrid logical clock value. Ordered by `(wall_ms, logical)`.
///
/// Encoded in signed objects as a CBOR map `{"wall_ms": uint, "logical": uint}` (fields in this
/// order; see `data-schema/op.cddl`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Physical part: unix time in milliseconds (the largest seen so far).
    pub wall_ms: u64,
    /// Logical counter that orders events within the same millisecond.
    pub logical: u32,
}

/// A remote timestamp that is too far ahead of our clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote clock is {ahead_ms} ms ahead of ours (limit {max_skew_ms} ms); refusing its timestamp"
)]
pub struct SkewError {
    /// How far ahead the remote timestamp is.
    pub ahead_ms: u64,
    /// The bound that was exceeded.
    pub max_skew_ms: u64,
}

impl Hlc {
    /// The clock value for a local event at wall time `now_ms`. Always strictly greater than `self`.
    pub fn tick(self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            Hlc {
                wall_ms: now_ms,
                logical: 0,
            }
        } else {
            self.bump()
        }
    }

    /// The clock value after receiving `remote` at wall time `now_ms`. Strictly greater than both
    /// `self` and `remote`. Refuses a remote timestamp more than `max_skew_ms` ahead of `now_ms`,
    /// so one peer with a broken clock cannot drag every clock of the cluster into the future.
    pub fn observe(self, remote: Hlc, now_ms: u64, max_skew_ms: u64) -> Result<Hlc, SkewError> {
        let limit = now_ms.saturating_add(max_skew_ms);
        if remote.wall_ms > limit {
            return Err(SkewError {
                ahead_ms: remote.wall_ms - now_ms,
                max_skew_ms,
            });
        }
        let wall = self.wall_ms.max(remote.wall_ms).max(now_ms);
        Ok(if wall == self.wall_ms && wall == remote.wall_ms {
            Hlc {
                wall_ms: wall,
                logical: self.logical.max(remote.logical),
            }
            .bump()
        } else if wall == self.wall_ms {
            self.bump()
        } else if wall == remote.wall_ms {
            remote.bump()
        } else {
            Hlc {
                wall_ms: wall,
                logical: 0,
            }
        })
    }

    /// The next value after `self`. On logical-counter overflow (4 billion events in one
    /// millisecond) it moves to the next millisecond rather than wrapping or panicking.
    fn bump(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc {
                wall_ms: self.wall_ms,
                logical,
            },
            None => Hlc {
                wall_ms: self.wall_ms.saturating_add(1),
                logical: 0,
            },
        }
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hlc() -> impl Strategy<Value = Hlc> {
        (
            0u64..1_000_000,
            prop_oneof![0u32..10, Just(u32::MAX - 1), Just(u32::MAX)],
        )
            .prop_map(|(wall_ms, logical)| Hlc { wall_ms, logical })
    }

    #[test]
    fn tick_follows_wall_clock_and_counts_within_a_millisecond() {
        let a = Hlc::default().tick(100);
        assert_eq!(
            a,
            Hlc {
                wall_ms: 100,
                logical: 0
            }
        );
        assert_eq!(
            a.tick(100),
            Hlc {
                wall_ms: 100,
                logical: 1
            }
        );
        // The wall clock stepped back: the HLC does not.
        assert_eq!(
            a.tick(50),
            Hlc {
                wall_ms: 100,
                logical: 1
            }
        );
        assert_eq!(
            a.tick(101),
            Hlc {
                wall_ms: 101,
                logical: 0
            }
        );
    }

    #[test]
    fn logical_overflow_moves_to_next_millisecond() {
        let a = Hlc {
            wall_ms: 7,
            logical: u32::MAX,
        };
        assert_eq!(
            a.tick(0),
            Hlc {
                wall_ms: 8,
                logical: 0
            }
        );
    }

    #[test]
    fn observe_refuses_a_clock_beyond_the_skew_bound() {
        let local = Hlc {
            wall_ms: 1_000,
            logical: 0,
        };
        let remote = Hlc {
            wall_ms: 1_000 + 5_001,
            logical: 0,
        };
        let err = local
            .observe(remote, 1_000, 5_000)
            .expect_err("too far ahead");
        assert_eq!(err.ahead_ms, 5_001);
        let ok = local
            .observe(
                Hlc {
                    wall_ms: 6_000,
                    logical: 3,
                },
                1_000,
                5_000,
            )
            .expect("in bound");
        assert_eq!(
            ok,
            Hlc {
                wall_ms: 6_000,
                logical: 4
            }
        );
    }

    proptest! {
        #[test]
        fn ticks_strictly_increase(start in hlc(), nows in proptest::collection::vec(0u64..2_000_000, 1..50)) {
            let mut c = start;
            for now in nows {
                let next = c.tick(now);
                prop_assert!(next > c);
                prop_assert!(next.wall_ms >= now);
                c = next;
            }
        }

        #[test]
        fn observe_exceeds_both_and_stays_within_skew(local in hlc(), remote in hlc(), now in 0u64..2_000_000, skew in 0u64..100_000) {
            match local.observe(remote, now, skew) {
                Ok(next) => {
                    prop_assert!(next > local);
                    prop_assert!(next > remote);
                    // The physical part never runs further ahead than the largest input (+1 on overflow).
                    let max_in = local.wall_ms.max(remote.wall_ms).max(now);
                    prop_assert!(next.wall_ms <= max_in + 1);
                    prop_assert!(remote.wall_ms <= now + skew);
                }
                Err(e) => {
                    prop_assert!(remote.wall_ms > now + skew);
                    prop_assert_eq!(e.ahead_ms, remote.wall_ms - now);
                }
            }
        }
    }
}
