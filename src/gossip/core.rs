//! The sans-IO replication state machine of one server (no sockets, no clock, no store writes).
//!
//! Inputs: ops appended locally ([`Core::local_ops`]), a datagram from a peer
//! ([`Core::handle_datagram`]), the answer to a stream request ([`Core::handle_response`]), the
//! results of submitting ops to the store ([`Core::submitted`]), peers connecting and leaving
//! ([`Core::peer_up`], [`Core::peer_down`]) and time ([`Core::tick`]). Outputs, drained with
//! [`Core::poll_output`]: datagrams to send, stream requests to make, ops to submit to the store,
//! members to connect to. Time (`now_ms`) and randomness (a seed) are arguments, so the in-process
//! harness (`super::harness`) runs whole clusters deterministically.
//!
//! **Push.** A new op is pushed in datagrams, packed up to the connection's
//! `max_datagram_size()`; an op that does not fit in one datagram is not pushed (counted in
//! `too_large`) and travels by anti-entropy. Two strategies ([`Push`]):
//! * [`Push::All`] (the default): the origin sends each of its ops to every connected peer;
//!   receivers do not forward. One hop, one copy per peer, the fewest bytes; a lost datagram
//!   waits for anti-entropy (≤ 1 s, or sooner when the origin's next op reveals the gap). The
//!   origin's work is O(N) per op, which is small for the tens of servers a cluster has.
//! * [`Push::Fanout`] (`k`): the origin sends to `k` random peers, and every server that appends
//!   an op it received by push forwards it to `k` random peers (not the one it came from, not the
//!   origin): infect-and-die epidemic dissemination. Constant work per server and redundancy
//!   against loss (each server receives an op about k times), but O(log N) hops and about k·N
//!   copies per op, and with k = 4 about e^-4 ≈ 2 % of servers miss an op and wait for
//!   anti-entropy.
//! * [`Push::Streams`] (the naive baseline of the benchmark, never the default): what a
//!   straightforward implementation does: the origin sends each op to every peer on its own
//!   reliable QUIC stream (one unidirectional stream per op per peer), no packing, no datagrams.
//!
//! Measured (`benches/gossip_convergence.rs`, one process per server, real QUIC on loopback,
//! N = 3, 10, 30), `All` reaches every server faster than `Fanout` at every N with 2-5x fewer
//! bytes (fanout's tail at N = 30 is set by anti-entropy), and as fast as `Streams` (within
//! run-to-run noise) with 7-10 % fewer UDP bytes and 35-50 % fewer UDP datagrams. So `All` is
//! the default; `Fanout` stays a parameter for much larger or lossier clusters, `Streams` is the
//! benchmark's naive baseline.
//!
//! **Anti-entropy.** Every `anti_entropy_ms` (1 s), immediately when a peer comes up, a server
//! sends its per-origin heads to one random peer on a stream ([`Request::Heads`]); the answer is
//! the peer's heads, and for every origin where the peer is ahead the server fetches the missing
//! range ([`Request::Fetch`], bounded responses, repeated until caught up). A pushed op whose seq
//! is ahead of the local head (a gap) is buffered (bounded, [`CoreConfig::max_buffered_ops`]) and
//! the gap is fetched at once from the peer that pushed it; buffered ops are submitted as soon as
//! the gap is filled.
//!
//! **Membership.** SWIM ([`super::membership`]) packets ride in datagrams on the same
//! connections.
//!
//! Every op goes to the store through `Store::submit_batch`, the one validation path of local
//! writes: a forged op (bad signature, signed by another server than its origin, equivocation)
//! is refused there and counted in `ops_rejected`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::membership::{MemberEvent, Membership, PeerStatus, ServerId, SwimConfig};
use super::wire::{self, Blob, Datagram, Request, Response};
use crate::keys::PublicKey;
use crate::store::{StoreError, Submitted};

/// How new ops are pushed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Push {
    /// The origin packs ops into datagrams for every peer; no forwarding (the default).
    All,
    /// The origin sends to `k` random peers; receivers forward new ops to `k` random peers.
    Fanout { k: usize },
    /// The origin sends each op to every peer on its own stream (benchmark baseline).
    Streams,
}

impl std::str::FromStr for Push {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Push::All),
            "streams" => Ok(Push::Streams),
            _ => match s.strip_prefix("fanout") {
                Some("") => Ok(Push::Fanout { k: 4 }),
                Some(k) => k
                    .trim_start_matches([':', '='])
                    .parse()
                    .map(|k| Push::Fanout { k })
                    .map_err(|_| format!("bad fanout in {s:?}")),
                None => Err(format!(
                    "unknown push strategy {s:?} (all | fanout[:K] | streams)"
                )),
            },
        }
    }
}

/// Tuning of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub push: Push,
    /// Anti-entropy period.
    pub anti_entropy_ms: u64,
    /// A stream request without an answer after this long is given up (and retried later).
    pub request_timeout_ms: u64,
    /// Most out-of-order ops held while their gap is fetched (beyond: dropped, fetched later).
    pub max_buffered_ops: usize,
    pub swim: SwimConfig,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            push: Push::All,
            anti_entropy_ms: 1000,
            request_timeout_ms: 5000,
            max_buffered_ops: 10_000,
            swim: SwimConfig::default(),
        }
    }
}

/// How ops reached us (decides forwarding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// In a pushed datagram from this peer.
    Push(PublicKey),
    /// In a fetch answer from this peer.
    Fetch(PublicKey),
}

impl Via {
    fn peer(&self) -> PublicKey {
        match self {
            Via::Push(p) | Via::Fetch(p) => *p,
        }
    }
}

/// Something the IO driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this datagram on the connection to `to`.
    Datagram { to: PublicKey, bytes: Vec<u8> },
    /// Send this one op envelope on a new unidirectional stream to `to` ([`Push::Streams`]);
    /// the peer passes it to [`Core::handle_stream_op`].
    Stream { to: PublicKey, op: Vec<u8> },
    /// Open a stream to `to`, send `req`, and report the answer with [`Core::handle_response`].
    Request {
        to: PublicKey,
        id: u64,
        req: Request,
    },
    /// Submit these op envelopes to the store (one `submit_batch`, in this order) and report the
    /// results with [`Core::submitted`].
    Submit { via: Via, ops: Vec<Vec<u8>> },
    /// A SWIM member this server is not connected to: connect (and authenticate) it.
    Connect(ServerId),
}

/// What submitting one op did (from `Store::submit_batch`'s result).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Appended {
        origin: PublicKey,
        seq: u64,
    },
    Duplicate {
        origin: PublicKey,
        seq: u64,
    },
    Gap {
        origin: PublicKey,
        missing: u64,
        got: u64,
    },
    /// Refused by validation (signature, origin, equivocation, clock skew...).
    Invalid(String),
}

impl Outcome {
    /// The outcome of one result of `Store::submit_batch`.
    pub fn of(r: &Result<Submitted, StoreError>) -> Outcome {
        match r {
            Ok(Submitted::Appended { origin, seq, .. }) => Outcome::Appended {
                origin: *origin,
                seq: *seq,
            },
            Ok(Submitted::Duplicate { origin, seq }) => Outcome::Duplicate {
                origin: *origin,
                seq: *seq,
            },
            Err(StoreError::Gap {
                origin,
                missing,
                got,
            }) => Outcome::Gap {
                origin: *origin,
                missing: *missing,
                got: *got,
            },
            Err(e) => Outcome::Invalid(e.to_string()),
        }
    }
}

/// Counters (monotonic) for status, health and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Counters {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// Not sent: the send buffer was full, or the connection refused the size.
    pub datagrams_dropped: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Ops too large for one datagram (left to anti-entropy).
    pub too_large: u64,
    pub ops_appended: u64,
    pub ops_duplicate: u64,
    /// Refused by the store's validation (forged, equivocating, ...).
    pub ops_rejected: u64,
    pub ops_buffered: u64,
    /// Out-of-order ops dropped because the buffer was full.
    pub buffer_overflow: u64,
    pub fetches: u64,
    pub fetched_ops: u64,
    pub heads_exchanges: u64,
    pub requests_failed: u64,
    /// Undecodable datagrams and refused SWIM packets.
    pub malformed: u64,
}

struct Peer {
    max_datagram: usize,
}

struct InFlight {
    to: PublicKey,
    req: Request,
    deadline_ms: u64,
}

/// The replication state machine of one server.
pub struct Core {
    me: PublicKey,
    cfg: CoreConfig,
    rng: StdRng,
    peers: BTreeMap<PublicKey, Peer>,
    /// The store's heads as last reported (local appends and submit results).
    heads: BTreeMap<PublicKey, u64>,
    /// Ops ahead of their origin's head, by (origin, seq): waiting for the gap to be filled.
    buffer: BTreeMap<(PublicKey, u64), (Vec<u8>, Via)>,
    /// Stream requests awaiting an answer, by id.
    in_flight: BTreeMap<u64, InFlight>,
    /// Origins being fetched, and up to which seq (one fetch per origin at a time).
    fetching: BTreeMap<PublicKey, u64>,
    /// Origins whose fetch must continue after submission: (peer, up to seq).
    want: BTreeMap<PublicKey, (PublicKey, u64)>,
    next_id: u64,
    next_anti_entropy_ms: u64,
    membership: Membership,
    out: VecDeque<Output>,
    counters: Counters,
}

impl Core {
    /// A new core for server `me` (SWIM identity `me_id`), whose store holds `heads`.
    pub fn new(
        me_id: ServerId,
        heads: BTreeMap<PublicKey, u64>,
        cfg: CoreConfig,
        seed: u64,
        now_ms: u64,
    ) -> Core {
        let membership = Membership::new(me_id.clone(), &cfg.swim, seed ^ 0x5157_494d, now_ms);
        Core {
            me: me_id.key,
            next_anti_entropy_ms: now_ms + cfg.anti_entropy_ms,
            cfg,
            rng: StdRng::seed_from_u64(seed),
            peers: BTreeMap::new(),
            heads,
            buffer: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            fetching: BTreeMap::new(),
            want: BTreeMap::new(),
            next_id: 1,
            membership,
            out: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    pub fn me(&self) -> PublicKey {
        self.me
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The heads this core knows the store has.
    pub fn heads(&self) -> &BTreeMap<PublicKey, u64> {
        &self.heads
    }

    /// Connected peers.
    pub fn connected(&self) -> impl Iterator<Item = &PublicKey> {
        self.peers.keys()
    }

    pub fn is_connected(&self, peer: &PublicKey) -> bool {
        self.peers.contains_key(peer)
    }

    /// SWIM's view of the cluster.
    pub fn members(&self) -> Vec<(ServerId, PeerStatus)> {
        self.membership.members()
    }

    /// The SWIM status of one server.
    pub fn status_of(&self, key: &PublicKey) -> Option<PeerStatus> {
        self.membership.status_of(key)
    }

    /// Ops waiting in the out-of-order buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next output for the driver.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Core::tick`] must next be called.
    pub fn next_deadline(&self) -> u64 {
        let mut d = self.next_anti_entropy_ms;
        if let Some(s) = self.membership.next_deadline() {
            d = d.min(s);
        }
        if let Some(r) = self.in_flight.values().map(|f| f.deadline_ms).min() {
            d = d.min(r);
        }
        d
    }

    /// The driver failed to send a datagram (buffer full, too large): counted.
    pub fn datagram_dropped(&mut self) {
        self.counters.datagrams_dropped += 1;
    }

    /// An authenticated connection to `peer` is ready (after the Hello exchange), whose
    /// datagrams may be `max_datagram` bytes. Starts SWIM and anti-entropy with it.
    pub fn peer_up(&mut self, peer: ServerId, max_datagram: usize, now_ms: u64) {
        if peer.key == self.me {
            return;
        }
        self.peers.insert(peer.key, Peer { max_datagram });
        self.membership.announce(peer.clone(), now_ms);
        self.drain_membership();
        self.request_heads(peer.key, now_ms);
    }

    /// The connection to `peer` closed.
    pub fn peer_down(&mut self, peer: &PublicKey, now_ms: u64) {
        self.peers.remove(peer);
        let failed: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.to == *peer)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            self.handle_response(id, None, now_ms);
        }
    }

    /// The path MTU of a connection changed.
    pub fn set_max_datagram(&mut self, peer: &PublicKey, max: usize) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.max_datagram = max;
        }
    }

    /// Ops this server appended to its own store (already in the log): pushed to peers.
    pub fn local_ops(&mut self, ops: Vec<Vec<u8>>) {
        let mut fresh = Vec::new();
        for op in ops {
            let Some((origin, seq)) = wire::peek_op(&op) else {
                continue;
            };
            let head = self.heads.entry(origin).or_insert(0);
            if seq > *head {
                *head = seq;
                fresh.push(op);
            }
        }
        if fresh.is_empty() {
            return;
        }
        let targets = match self.cfg.push {
            Push::All => self.peers.keys().copied().collect(),
            Push::Fanout { k } => self.pick_peers(k, &[]),
            Push::Streams => {
                let peers: Vec<PublicKey> = self.peers.keys().copied().collect();
                for to in peers {
                    for op in &fresh {
                        self.counters.bytes_sent += op.len() as u64;
                        self.out.push_back(Output::Stream { to, op: op.clone() });
                    }
                }
                return;
            }
        };
        for to in targets {
            self.push_to(to, &fresh);
        }
    }

    /// A datagram from the authenticated peer `from`.
    pub fn handle_datagram(&mut self, from: PublicKey, bytes: &[u8], now_ms: u64) {
        self.counters.datagrams_received += 1;
        self.counters.bytes_received += bytes.len() as u64;
        if !self.peers.contains_key(&from) {
            return; // not (or no longer) an authenticated peer
        }
        match wire::decode_datagram(bytes) {
            Ok(Datagram::Ops(ops)) => self.receive_ops(
                Via::Push(from),
                ops.into_iter().map(|b| b.0).collect(),
                now_ms,
            ),
            Ok(Datagram::Swim(data)) => {
                if let Err(e) = self.membership.handle_data(&from, &data.0, now_ms) {
                    self.counters.malformed += 1;
                    tracing::debug!(peer = %from, error = %e, "SWIM packet refused");
                }
                self.drain_membership();
            }
            Err(e) => {
                self.counters.malformed += 1;
                tracing::debug!(peer = %from, error = %e, "undecodable gossip datagram");
            }
        }
    }

    /// One op pushed on its own stream by the authenticated peer `from` ([`Push::Streams`]).
    pub fn handle_stream_op(&mut self, from: PublicKey, op: Vec<u8>, now_ms: u64) {
        self.counters.bytes_received += op.len() as u64;
        if self.peers.contains_key(&from) {
            self.receive_ops(Via::Push(from), vec![op], now_ms);
        }
    }

    /// The answer to request `id` (`None`: it failed: stream error, timeout, peer gone).
    pub fn handle_response(&mut self, id: u64, resp: Option<Response>, now_ms: u64) {
        let Some(f) = self.in_flight.remove(&id) else {
            return; // timed out earlier
        };
        match (f.req, resp) {
            (Request::Heads(_), Some(Response::Heads(theirs))) => {
                for h in theirs {
                    let ours = self.heads.get(&h.origin).copied().unwrap_or(0);
                    if h.seq > ours {
                        self.fetch(f.to, h.origin, ours + 1, h.seq, now_ms);
                    }
                }
            }
            (Request::Fetch { origin, to, .. }, Some(Response::Ops(ops))) => {
                self.fetching.remove(&origin);
                self.counters.fetched_ops += ops.len() as u64;
                if !ops.is_empty() {
                    self.want.insert(origin, (f.to, to));
                    self.out.push_back(Output::Submit {
                        via: Via::Fetch(f.to),
                        ops: ops.into_iter().map(|b| b.0).collect(),
                    });
                }
            }
            (req, resp) => {
                if let Request::Fetch { origin, .. } = req {
                    self.fetching.remove(&origin);
                }
                self.counters.requests_failed += 1;
                if let Some(Response::Refused(why)) = resp {
                    tracing::debug!(peer = %f.to, reason = %why, "gossip request refused");
                }
            }
        }
    }

    /// The results of an [`Output::Submit`]: `ops[i]` gave `outcomes[i]`.
    pub fn submitted(&mut self, via: Via, ops: Vec<Vec<u8>>, outcomes: Vec<Outcome>, now_ms: u64) {
        let mut forward = Vec::new();
        let mut touched = BTreeSet::new();
        for (op, outcome) in ops.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Appended { origin, seq } => {
                    self.counters.ops_appended += 1;
                    let head = self.heads.entry(origin).or_insert(0);
                    *head = (*head).max(seq);
                    touched.insert(origin);
                    if matches!(via, Via::Push(_)) {
                        forward.push((origin, op));
                    }
                }
                Outcome::Duplicate { origin, seq } => {
                    self.counters.ops_duplicate += 1;
                    let head = self.heads.entry(origin).or_insert(0);
                    *head = (*head).max(seq);
                    touched.insert(origin);
                }
                Outcome::Gap {
                    origin,
                    missing,
                    got,
                } => {
                    // The store is behind what we thought: buffer and fetch the gap.
                    self.heads.insert(origin, missing - 1);
                    self.buffer_op(origin, got, op, via);
                    self.fetch(via.peer(), origin, missing, got - 1, now_ms);
                }
                Outcome::Invalid(why) => {
                    self.counters.ops_rejected += 1;
                    tracing::warn!(peer = %via.peer(), reason = %why, "op from peer refused");
                }
            }
        }
        // Forward what we appended from a push (fanout), away from its sender and origin.
        if let Push::Fanout { k } = self.cfg.push
            && !forward.is_empty()
        {
            let mut by_origin: BTreeMap<PublicKey, Vec<Vec<u8>>> = BTreeMap::new();
            for (origin, op) in forward {
                by_origin.entry(origin).or_default().push(op);
            }
            for (origin, ops) in by_origin {
                for to in self.pick_peers(k, &[via.peer(), origin]) {
                    self.push_to(to, &ops);
                }
            }
        }
        for origin in touched {
            self.release_buffered(origin);
            if let Some((peer, to)) = self.want.get(&origin).copied() {
                let head = self.heads.get(&origin).copied().unwrap_or(0);
                if head >= to {
                    self.want.remove(&origin);
                } else if self.peers.contains_key(&peer) {
                    self.want.remove(&origin);
                    self.fetch(peer, origin, head + 1, to, now_ms);
                }
            }
        }
    }

    /// Advances time: SWIM timers, request timeouts, anti-entropy.
    pub fn tick(&mut self, now_ms: u64) {
        self.membership.tick(now_ms);
        self.drain_membership();
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.handle_response(id, None, now_ms);
        }
        if now_ms >= self.next_anti_entropy_ms {
            self.next_anti_entropy_ms = now_ms + self.cfg.anti_entropy_ms;
            if let Some(peer) = self.pick_peers(1, &[]).pop() {
                self.request_heads(peer, now_ms);
            }
        }
    }

    // ---- internals ----

    fn receive_ops(&mut self, via: Via, ops: Vec<Vec<u8>>, now_ms: u64) {
        // Sort by (origin, seq) so consecutive seqs go into one batch in order.
        let mut keyed: Vec<((PublicKey, u64), Vec<u8>)> = ops
            .into_iter()
            .filter_map(|op| wire::peek_op(&op).map(|k| (k, op)))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        let mut next: BTreeMap<PublicKey, u64> = BTreeMap::new();
        let mut batch = Vec::new();
        for ((origin, seq), op) in keyed {
            let expected = *next
                .entry(origin)
                .or_insert_with(|| self.heads.get(&origin).copied().unwrap_or(0) + 1);
            if seq < expected {
                self.counters.ops_duplicate += 1;
            } else if seq == expected {
                next.insert(origin, seq + 1);
                batch.push(op);
            } else {
                self.buffer_op(origin, seq, op, via);
                self.fetch(via.peer(), origin, expected, seq - 1, now_ms);
            }
        }
        if !batch.is_empty() {
            self.out.push_back(Output::Submit { via, ops: batch });
        }
    }

    fn buffer_op(&mut self, origin: PublicKey, seq: u64, op: Vec<u8>, via: Via) {
        if self.buffer.contains_key(&(origin, seq)) {
            return;
        }
        if self.buffer.len() >= self.cfg.max_buffered_ops {
            self.counters.buffer_overflow += 1;
            return;
        }
        self.counters.ops_buffered += 1;
        self.buffer.insert((origin, seq), (op, via));
    }

    /// Submits buffered ops of `origin` that now follow its head; drops the ones already in.
    fn release_buffered(&mut self, origin: PublicKey) {
        let head = self.heads.get(&origin).copied().unwrap_or(0);
        let stale: Vec<_> = self
            .buffer
            .range((origin, 0)..=(origin, head))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.buffer.remove(&k);
        }
        let mut seq = head + 1;
        let mut ops = Vec::new();
        let mut via = None;
        while let Some((op, v)) = self.buffer.remove(&(origin, seq)) {
            via.get_or_insert(v);
            ops.push(op);
            seq += 1;
        }
        if let Some(via) = via {
            self.out.push_back(Output::Submit { via, ops });
        }
    }

    fn fetch(&mut self, peer: PublicKey, origin: PublicKey, from: u64, to: u64, now_ms: u64) {
        if from > to || !self.peers.contains_key(&peer) {
            return;
        }
        if let Some(t) = self.fetching.get_mut(&origin) {
            *t = (*t).max(to);
            return; // one fetch per origin at a time; the rest follows from `want`
        }
        self.fetching.insert(origin, to);
        self.counters.fetches += 1;
        self.request(peer, Request::Fetch { origin, from, to }, now_ms);
    }

    fn request_heads(&mut self, peer: PublicKey, now_ms: u64) {
        self.counters.heads_exchanges += 1;
        let heads = wire::heads_to_wire(&self.heads);
        self.request(peer, Request::Heads(heads), now_ms);
    }

    fn request(&mut self, to: PublicKey, req: Request, now_ms: u64) {
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(
            id,
            InFlight {
                to,
                req: req.clone(),
                deadline_ms: now_ms + self.cfg.request_timeout_ms,
            },
        );
        self.out.push_back(Output::Request { to, id, req });
    }

    /// Up to `k` distinct random connected peers, excluding `not`.
    fn pick_peers(&mut self, k: usize, not: &[PublicKey]) -> Vec<PublicKey> {
        let mut candidates: Vec<PublicKey> = self
            .peers
            .keys()
            .filter(|p| !not.contains(p))
            .copied()
            .collect();
        // Partial Fisher-Yates.
        let n = candidates.len();
        let k = k.min(n);
        for i in 0..k {
            let j = self.rng.random_range(i..n);
            candidates.swap(i, j);
        }
        candidates.truncate(k);
        candidates
    }

    /// Packs `ops` into datagrams for `to`, each within its max datagram size.
    fn push_to(&mut self, to: PublicKey, ops: &[Vec<u8>]) {
        let Some(max) = self.peers.get(&to).map(|p| p.max_datagram) else {
            return;
        };
        let mut pack: Vec<Blob> = Vec::new();
        for op in ops {
            pack.push(Blob(op.clone()));
            let fits = pack.len() <= wire::MAX_OPS_PER_DATAGRAM
                && wire::encode(&Datagram::Ops(pack.clone())).len() <= max;
            if fits {
                continue;
            }
            let last = pack.pop().expect("just pushed");
            if !pack.is_empty() {
                self.send_datagram(to, &Datagram::Ops(std::mem::take(&mut pack)));
            }
            if wire::encode(&Datagram::Ops(vec![last.clone()])).len() <= max {
                pack.push(last);
            } else {
                self.counters.too_large += 1;
            }
        }
        if !pack.is_empty() {
            self.send_datagram(to, &Datagram::Ops(pack));
        }
    }

    fn send_datagram(&mut self, to: PublicKey, d: &Datagram) {
        let bytes = wire::encode(d);
        self.counters.datagrams_sent += 1;
        self.counters.bytes_sent += bytes.len() as u64;
        self.out.push_back(Output::Datagram { to, bytes });
    }

    fn drain_membership(&mut self) {
        while let Some((to, data)) = self.membership.poll_send() {
            if self.peers.contains_key(&to.key) {
                self.send_datagram(to.key, &Datagram::Swim(Blob(data.to_vec())));
            } else if to.key != self.me {
                self.out.push_back(Output::Connect(to));
            }
        }
        while let Some(ev) = self.membership.poll_event() {
            match ev {
                MemberEvent::Up(id) => {
                    tracing::info!(peer = %id.key, addr = %id.addr, "gossip member up");
                    if !self.peers.contains_key(&id.key) {
                        self.out.push_back(Output::Connect(id));
                    }
                }
                MemberEvent::Down(id) => {
                    tracing::warn!(peer = %id.key, addr = %id.addr, "gossip member declared dead");
                }
            }
        }
    }
}

/// Answers a peer's request from the store (bounded; see [`wire::Request`]).
pub fn answer(store: &crate::store::Store, req: &Request) -> Response {
    match req {
        Request::Heads(_) => Response::Heads(wire::heads_to_wire(store.heads())),
        Request::Fetch { origin, from, to } => {
            if from > to || *from == 0 {
                return Response::Refused(format!("bad range {from}..={to}"));
            }
            let to = (*to).min(from.saturating_add(wire::MAX_FETCH_OPS - 1));
            match store.ops_of(origin, *from, to) {
                Ok(ops) => {
                    let mut out = Vec::new();
                    let mut bytes = 0;
                    for op in ops {
                        if bytes >= wire::MAX_FETCH_BYTES {
                            break;
                        }
                        bytes += op.len();
                        out.push(Blob(op));
                    }
                    Response::Ops(out)
                }
                Err(e) => Response::Refused(format!("store error: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_strategy_parses() {
        assert_eq!("all".parse::<Push>(), Ok(Push::All));
        assert_eq!("fanout".parse::<Push>(), Ok(Push::Fanout { k: 4 }));
        assert_eq!("fanout:3".parse::<Push>(), Ok(Push::Fanout { k: 3 }));
        assert_eq!("streams".parse::<Push>(), Ok(Push::Streams));
        assert!("other".parse::<Push>().is_err());
    }
}
