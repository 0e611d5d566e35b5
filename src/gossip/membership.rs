//! SWIM membership and failure detection of the servers: a small sans-IO wrapper around `foca`.
//!
//! A member is a [`ServerId`]: the server's Ed25519 key (foca's "address": one member per key),
//! its gossip address (so members learn where to connect to each other) and a `bump` counter
//! that foca increments when the server finds itself declared down (a restarted server rejoins
//! with a higher bump and wins over its old identity).
//!
//! Foca's packets travel as [`super::wire::Datagram::Swim`] on the authenticated QUIC
//! connections. [`Membership::handle_data`] refuses a packet whose SWIM sender is not the
//! connection's authenticated peer, so a server cannot speak for another one. (Members carried
//! *inside* a packet are the sender's view of others, which SWIM spreads by design; they only
//! drive liveness, never authority: every connection is authenticated on its own.)
//!
//! Timing (defaults, [`SwimConfig`]): probe every 1 s, probe round trip 400 ms, suspect to down
//! after 3 s: a crashed server is declared dead about 3 to 5 s after it stops answering.
//! Time is an argument (`now_ms`), randomness a seed.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{Codec, Foca, Identity, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// A server as a SWIM member.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServerId {
    pub key: PublicKey,
    /// Gossip address, `host:port`.
    pub addr: String,
    /// Raised by foca when this server finds itself declared down (a rejoin).
    pub bump: u16,
}

impl Identity for ServerId {
    type Addr = PublicKey;

    fn renew(&self) -> Option<Self> {
        Some(ServerId {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> PublicKey {
        self.key
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        // Wrapping comparison: a bump at most half the range ahead wins.
        self.bump.wrapping_sub(other.bump) < u16::MAX / 2 && self.bump != other.bump
    }
}

/// How a member looks from here.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    Alive,
    Suspect,
    Dead,
}

/// SWIM timing.
#[derive(Clone, Debug)]
pub struct SwimConfig {
    pub probe_period_ms: u64,
    pub probe_rtt_ms: u64,
    pub suspect_to_down_ms: u64,
    /// Largest SWIM packet (must fit a datagram with the wrapper's few bytes of overhead).
    pub max_packet: usize,
}

impl Default for SwimConfig {
    fn default() -> Self {
        SwimConfig {
            probe_period_ms: 1000,
            probe_rtt_ms: 400,
            suspect_to_down_ms: 3000,
            max_packet: 1100,
        }
    }
}

/// A change of membership, for the caller (connect, count, log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    Up(ServerId),
    Down(ServerId),
}

type Inner = Foca<ServerId, PostcardCodec, StdRng, NoCustomBroadcast>;

/// The SWIM state machine of one server.
pub struct Membership {
    foca: Inner,
    rt: foca::AccumulatingRuntime<ServerId>,
    /// Pending foca timers by (due ms, insertion order).
    timers: BTreeMap<(u64, u64), Timer<ServerId>>,
    timer_seq: u64,
    now_ms: u64,
    events: Vec<MemberEvent>,
}

impl Membership {
    /// A new member `me` with the given timing and RNG seed, at time `now_ms`.
    pub fn new(me: ServerId, cfg: &SwimConfig, seed: u64, now_ms: u64) -> Membership {
        let mut c = foca::Config::new_lan(NonZeroU32::new(32).expect("non-zero"));
        c.probe_period = Duration::from_millis(cfg.probe_period_ms);
        c.probe_rtt = Duration::from_millis(cfg.probe_rtt_ms);
        c.suspect_to_down_after = Duration::from_millis(cfg.suspect_to_down_ms);
        c.max_packet_size = NonZeroUsize::new(cfg.max_packet.max(64)).expect("non-zero");
        // Re-announce to members declared down, so a partition heals without operator help.
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(5),
            num_members: NonZeroUsize::new(2).expect("non-zero"),
        });
        let foca = Foca::new(me, c, StdRng::seed_from_u64(seed), PostcardCodec);
        Membership {
            foca,
            rt: foca::AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            now_ms,
            events: Vec::new(),
        }
    }

    /// This server's current identity (its bump may have risen).
    pub fn me(&self) -> &ServerId {
        self.foca.identity()
    }

    /// Asks `peer` to let us join (on a new authenticated connection).
    pub fn announce(&mut self, peer: ServerId, now_ms: u64) {
        self.now_ms = now_ms;
        if let Err(e) = self.foca.announce(peer, &mut self.rt) {
            tracing::debug!(error = %e, "SWIM announce failed");
        }
        self.drain();
    }

    /// A SWIM packet from the authenticated peer `from`. Refused when its sender is another key.
    pub fn handle_data(
        &mut self,
        from: &PublicKey,
        data: &[u8],
        now_ms: u64,
    ) -> Result<(), String> {
        self.now_ms = now_ms;
        let mut buf = data;
        let header: foca::Header<ServerId> = PostcardCodec
            .decode_header(&mut buf)
            .map_err(|e| format!("malformed SWIM packet: {e}"))?;
        if header.src.key != *from {
            return Err(format!(
                "SWIM packet claims sender {} but the connection is {from}",
                header.src.key
            ));
        }
        let r = self.foca.handle_data(data, &mut self.rt);
        self.drain();
        r.map_err(|e| format!("SWIM packet refused: {e}"))
    }

    /// Runs the timers due at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        while let Some((&(due, seq), _)) = self.timers.first_key_value() {
            if due > now_ms {
                break;
            }
            let Some(t) = self.timers.remove(&(due, seq)) else {
                break;
            };
            if let Err(e) = self.foca.handle_timer(t, &mut self.rt) {
                tracing::debug!(error = %e, "SWIM timer failed");
            }
            self.drain();
        }
    }

    /// When [`Membership::tick`] must next be called.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.keys().next().map(|(d, _)| *d)
    }

    /// The next SWIM packet to send: (destination, bytes).
    pub fn poll_send(&mut self) -> Option<(ServerId, bytes::Bytes)> {
        self.rt.to_send()
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }

    /// Every known member and its status (down members included until foca forgets them).
    pub fn members(&self) -> Vec<(ServerId, PeerStatus)> {
        let mut out: Vec<_> = self
            .foca
            .iter_membership_state()
            .map(|m| {
                let s = match m.state() {
                    foca::State::Alive => PeerStatus::Alive,
                    foca::State::Suspect => PeerStatus::Suspect,
                    foca::State::Down => PeerStatus::Dead,
                };
                (m.id().clone(), s)
            })
            .collect();
        out.sort();
        out
    }

    /// The status of `key`, if it is a known member.
    pub fn status_of(&self, key: &PublicKey) -> Option<PeerStatus> {
        self.members()
            .into_iter()
            .filter(|(id, _)| id.key == *key)
            .map(|(_, s)| s)
            .next()
    }

    /// Moves foca's timers and notifications into our queues.
    fn drain(&mut self) {
        while let Some((after, timer)) = self.rt.to_schedule() {
            let due = self.now_ms + after.as_millis() as u64;
            self.timer_seq += 1;
            self.timers.insert((due, self.timer_seq), timer);
        }
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => self.events.push(MemberEvent::Up(id)),
                OwnedNotification::MemberDown(id) => self.events.push(MemberEvent::Down(id)),
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(bump = id.bump, "declared down by the cluster; rejoined")
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ServerId {
        ServerId {
            key: PublicKey([b; 32]),
            addr: format!("10.0.0.{b}:9102"),
            bump: 0,
        }
    }

    /// Delivers every queued packet between members (except to/from `down`), then ticks.
    fn run(ms: &mut [Membership], down: Option<usize>, from_ms: u64, to_ms: u64) {
        let mut now = from_ms;
        while now <= to_ms {
            for _ in 0..10 {
                let mut moved = false;
                for i in 0..ms.len() {
                    while let Some((to, data)) = ms[i].poll_send() {
                        moved = true;
                        let j = ms.iter().position(|m| m.me().key == to.key).expect("known");
                        if down == Some(i) || down == Some(j) {
                            continue;
                        }
                        let from = ms[i].me().key;
                        let _ = ms[j].handle_data(&from, &data, now);
                    }
                }
                if !moved {
                    break;
                }
            }
            for m in ms.iter_mut() {
                m.tick(now);
            }
            now += 50;
        }
    }

    #[test]
    fn a_dead_member_is_detected_and_a_returning_one_readmitted() {
        let cfg = SwimConfig::default();
        let mut ms: Vec<_> = (1..=4u8)
            .map(|b| Membership::new(id(b), &cfg, b as u64, 0))
            .collect();
        for i in 1..4 {
            let first = ms[0].me().clone();
            ms[i].announce(first, 0);
        }
        run(&mut ms, None, 0, 3_000);
        for m in &ms {
            let alive = m
                .members()
                .iter()
                .filter(|(_, s)| *s == PeerStatus::Alive)
                .count();
            assert_eq!(alive, 3, "everyone sees the three others alive");
        }
        // Member 3 stops answering: detected within seconds.
        run(&mut ms, Some(3), 3_050, 9_000);
        for m in &ms[..3] {
            assert_eq!(m.status_of(&id(4).key), Some(PeerStatus::Dead));
        }
        // It comes back (same state machine, it learns it was declared down and rejoins).
        run(&mut ms, None, 9_050, 20_000);
        for m in &ms[..3] {
            assert_eq!(
                m.status_of(&id(4).key),
                Some(PeerStatus::Alive),
                "{:?}",
                m.members()
            );
        }
    }

    #[test]
    fn a_packet_speaking_for_another_server_is_refused() {
        let cfg = SwimConfig::default();
        let mut a = Membership::new(id(1), &cfg, 1, 0);
        let mut b = Membership::new(id(2), &cfg, 2, 0);
        a.announce(b.me().clone(), 0);
        let (_, data) = a.poll_send().expect("an announce");
        assert!(b.handle_data(&PublicKey([9; 32]), &data, 0).is_err());
        assert!(b.handle_data(&id(1).key, &data, 0).is_ok());
        assert!(b.handle_data(&id(1).key, &[0xff; 40], 0).is_err());
    }
}
