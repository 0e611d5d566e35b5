//! The IO driver of gossip: QUIC connections ([`super::transport`]) around the sans-IO
//! [`Core`], and the store.
//!
//! Tasks: one accepts connections; one per connection reads datagrams and one serves its
//! anti-entropy streams; ONE task owns the core (every input goes through a channel to it, every
//! output is executed by it); and one blocking thread submits received ops to the store, merging
//! whatever is queued into one `Store::submit_batch` (one transaction, one fsync), off the async
//! reactor so the API stays responsive. After ops are folded, [`StoreHost::ops_folded`] tells the
//! server (state hash cache, client-plane reconcile).
//!
//! **Connection set-up.** After the TLS handshake (both sides proved an Ed25519 key, see
//! [`super::transport`]), the dialer opens the first bidirectional stream and sends its
//! [`Hello`]; the acceptor checks it and answers with its own, which the dialer checks. Checks:
//! protocol version; cluster id (root key + overlay configuration: a misconfigured server is
//! refused with a reason naming both ids); the root-signed server certificate
//! (`trust::verify_server_cert`) must name the TLS-authenticated key, and the key must not be
//! revoked in the state. A server without a certificate is accepted only if it is the cluster
//! root itself (a genesis server whose key is the root) or an active server in the state. On
//! failure the connection is closed with a reason code ([`close`]). Nothing else is read from a
//! connection before its Hello verified; the author of every later message is its peer.
//!
//! **Addresses.** A server's gossip address travels in its Hello and in its SWIM identity, so
//! servers learn each other's addresses from the seeds (`--seed-peer`) and from membership;
//! there is no address in the replicated state. A server dials every SWIM member it is not
//! connected to, and re-dials its seeds every few seconds while not connected to them.
//!
//! **Revocation.** Every half second the node compares connected peers with the state: a
//! revoked key's connection is closed (code [`close::REVOKED`]) and the key is added to the set
//! the TLS verifiers refuse, so its later handshakes fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::core::{Core, CoreConfig, Counters, Outcome, Output, Via};
use super::membership::{PeerStatus, ServerId};
use super::transport::{self, Revoked, SignFn};
use super::wire::{self, Hello, Request, Response};
use crate::keys::PublicKey;
use crate::store::Store;

/// Close codes of gossip connections (with a reason text).
pub mod close {
    pub const PROTOCOL: u32 = 1;
    pub const CLUSTER_MISMATCH: u32 = 2;
    pub const NOT_ADMITTED: u32 = 3;
    pub const REVOKED: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
}

/// Where the driver finds the store, and whom it tells about folded ops.
pub trait StoreHost: Send + Sync + 'static {
    /// Runs `f` on the locked store; `None` when the store is gone (the server is stopping).
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> Option<R>;
    /// Ops from peers were appended (refresh caches, reconcile the dataplane).
    fn ops_folded(&self) {}
}

impl StoreHost for Mutex<Store> {
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> Option<R> {
        Some(f(&mut self.lock().unwrap_or_else(|p| p.into_inner())))
    }
}

/// The server's API state, held weakly so that gossip never keeps the store open at shutdown.
pub struct ApiHost {
    state: std::sync::Weak<crate::api::ApiState>,
    runtime: tokio::runtime::Handle,
}

impl StoreHost for ApiHost {
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> Option<R> {
        let st = self.state.upgrade()?;
        let mut guard = st.store.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut guard))
    }

    fn ops_folded(&self) {
        let Some(st) = self.state.upgrade() else {
            return;
        };
        // The version names the state that now includes the ops (read under the store lock).
        let version = {
            let _store = st.store.lock().unwrap_or_else(|p| p.into_inner());
            st.state_changed();
            st.version()
        };
        // Program the peers other servers enrolled: ask the client-plane reconciler to run.
        self.runtime.spawn(async move {
            if let Some(p) = &st.peers {
                p.sync(version, Duration::ZERO).await;
            }
        });
    }
}

static RUNNING: std::sync::OnceLock<Gossip> = std::sync::OnceLock::new();

/// The gossip node `serve` started in this process, if any (for `/api/health`).
pub fn running() -> Option<&'static Gossip> {
    RUNNING.get()
}

/// Starts gossip inside `serve`: listens on `listen`, advertises `public_host` with the listen
/// port when given (else the listen address), dials `seeds`, signs with `key` (the server's
/// identity, loaded a second time so gossip holds no reference to the API state).
pub fn start_for_server(
    state: &Arc<crate::api::ApiState>,
    key: crate::identity::NodeKey,
    listen: SocketAddr,
    public_host: Option<&str>,
    seeds: Vec<String>,
) -> Result<Gossip> {
    let me = key.public();
    let cert = {
        let s = state.store.lock().unwrap_or_else(|p| p.into_inner());
        own_certificate(&s, &me)
    };
    let advertise = match public_host {
        Some(h) => {
            let host = if h.contains(':') && !h.starts_with('[') {
                format!("[{h}]")
            } else {
                h.to_string()
            };
            Some(format!("{host}:{}", listen.port()))
        }
        _ => None,
    };
    let key = Arc::new(key);
    let sign: SignFn = Arc::new(move |m| key.pair().sign(m).as_ref().to_vec());
    let host = Arc::new(ApiHost {
        state: Arc::downgrade(state),
        runtime: tokio::runtime::Handle::current(),
    });
    let seed = u64::from_le_bytes(me.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    let g = start(
        host,
        me,
        sign,
        NodeConfig {
            listen,
            advertise,
            seeds,
            core: CoreConfig::default(),
            cert,
            rng_seed: seed ^ now_ms(),
        },
    )?;
    let _ = RUNNING.set(g.clone());
    Ok(g)
}

/// This server's certificate as recorded by its AdmitServer op (the first op of its own log).
fn own_certificate(store: &Store, me: &PublicKey) -> Vec<u8> {
    let Ok(ops) = store.ops_of(me, 1, 1) else {
        return Vec::new();
    };
    for bytes in ops {
        let Ok(v) = crate::op::verify_op(&bytes) else {
            continue;
        };
        if let crate::op::OpBody::Trust(crate::trust::TrustOp::AdmitServer { cert }) =
            v.logged.op.body
        {
            return cert;
        }
    }
    Vec::new()
}

/// Gossip settings of one server.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    /// The address other servers use to reach this one (`host:port`); default: `listen`.
    pub advertise: Option<String>,
    pub seeds: Vec<String>,
    pub core: CoreConfig,
    /// This server's root-signed certificate (empty: none; see the module docs).
    pub cert: Vec<u8>,
    pub rng_seed: u64,
}

/// One server as this one sees it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerView {
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub key: String,
    pub addr: String,
    pub status: PeerStatus,
    pub connected: bool,
}

/// What `/api/health` and `status` show.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GossipStatus {
    pub listen: String,
    pub peers: Vec<PeerView>,
    pub counters: Counters,
}

/// A running gossip node.
#[derive(Clone)]
pub struct Gossip {
    status: Arc<Mutex<GossipStatus>>,
    local: Arc<Notify>,
    endpoint: quinn::Endpoint,
    udp: Arc<Mutex<UdpSent>>,
}

/// What quinn counted as sent in UDP datagrams by this node's gossip connections.
#[derive(Default)]
struct UdpSent {
    /// Open connections, by stable id.
    open: BTreeMap<usize, quinn::Connection>,
    /// Totals of the connections that closed: (datagrams, bytes).
    closed: (u64, u64),
}

impl Gossip {
    pub fn status(&self) -> GossipStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Tells the node that local ops were appended (they are also noticed within 20 ms).
    pub fn notify_local(&self) {
        self.local.notify_one();
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// UDP datagrams and bytes sent on the authenticated gossip connections since start
    /// (quinn's `udp_tx`: every packet with its QUIC and crypto overhead, including ACKs,
    /// keep-alives, streams and datagrams; closed connections included). For benchmarks.
    pub fn udp_sent(&self) -> (u64, u64) {
        let u = self.udp.lock().unwrap_or_else(|p| p.into_inner());
        u.open.values().fold(u.closed, |(d, b), c| {
            let s = c.stats().udp_tx;
            (d + s.datagrams, b + s.bytes)
        })
    }

    /// Closes every connection.
    pub fn shutdown(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(close::SHUTDOWN), b"shutting down");
    }
}

enum Event {
    Up {
        id: ServerId,
        conn: quinn::Connection,
    },
    Down {
        key: PublicKey,
        stable_id: usize,
    },
    Datagram {
        from: PublicKey,
        bytes: Bytes,
    },
    StreamOp {
        from: PublicKey,
        op: Vec<u8>,
    },
    Response {
        id: u64,
        resp: Option<Response>,
    },
    Submitted {
        via: Via,
        ops: Vec<Vec<u8>>,
        outcomes: Vec<Outcome>,
    },
    Dialed {
        seed: String,
        key: Option<PublicKey>,
    },
}

struct Ctx<H> {
    host: Arc<H>,
    me: PublicKey,
    cluster: [u8; 32],
    advertise: String,
    cert: Vec<u8>,
    endpoint: quinn::Endpoint,
    events: mpsc::UnboundedSender<Event>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts gossip for the server `me` (signing with `sign`) on the tokio runtime.
pub fn start<H: StoreHost>(
    host: Arc<H>,
    me: PublicKey,
    sign: SignFn,
    cfg: NodeConfig,
) -> Result<Gossip> {
    let (cluster, heads, revoked_now) = host
        .with_store(|s| {
            let revoked: BTreeSet<PublicKey> = s.state().revoked_servers().collect();
            (
                wire::cluster_id(&s.root(), s.state().ipam().config()),
                s.heads().clone(),
                revoked,
            )
        })
        .ok_or_else(|| anyhow::anyhow!("the store is closed"))?;
    let revoked: Revoked = Arc::new(std::sync::RwLock::new(revoked_now));
    let endpoint = transport::endpoint(cfg.listen, me, sign, revoked.clone())?;
    let bound = endpoint.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        host,
        me,
        cluster,
        advertise: advertise.clone(),
        cert: cfg.cert.clone(),
        endpoint: endpoint.clone(),
        events: tx,
    });
    let status = Arc::new(Mutex::new(GossipStatus {
        listen: advertise.clone(),
        ..GossipStatus::default()
    }));
    let local = Arc::new(Notify::new());
    let udp = Arc::new(Mutex::new(UdpSent::default()));
    let me_id = ServerId {
        key: me,
        addr: advertise,
        bump: 0,
    };
    let core = Core::new(me_id, heads, cfg.core.clone(), cfg.rng_seed, now_ms());
    let submit = spawn_store_worker(ctx.clone());
    tokio::spawn(accept_loop(ctx.clone()));
    tokio::spawn(core_loop(
        ctx,
        core,
        rx,
        submit,
        cfg.seeds,
        status.clone(),
        local.clone(),
        revoked,
        udp.clone(),
    ));
    Ok(Gossip {
        status,
        local,
        endpoint,
        udp,
    })
}

type SubmitJob = (Via, Vec<Vec<u8>>);

/// The one thread that writes received ops to the store, merging queued jobs into one batch.
fn spawn_store_worker<H: StoreHost>(ctx: Arc<Ctx<H>>) -> std::sync::mpsc::Sender<SubmitJob> {
    let (tx, rx) = std::sync::mpsc::channel::<SubmitJob>();
    let spawned = std::thread::Builder::new()
        .name("gossip-store".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while let Ok(j) = rx.try_recv() {
                    jobs.push(j);
                }
                let all: Vec<Vec<u8>> = jobs.iter().flat_map(|(_, ops)| ops.clone()).collect();
                let results = ctx
                    .host
                    .with_store(|s| s.submit_batch(&all, now_ms()).map_err(|e| e.to_string()))
                    .unwrap_or_else(|| Err("the store is closed".into()));
                let outcomes: Vec<Outcome> = match results {
                    Ok(r) => r.iter().map(Outcome::of).collect(),
                    Err(e) => {
                        tracing::error!(error = %e, "store failed while submitting gossiped ops");
                        all.iter()
                            .map(|_| Outcome::Invalid(e.to_string()))
                            .collect()
                    }
                };
                if outcomes
                    .iter()
                    .any(|o| matches!(o, Outcome::Appended { .. }))
                {
                    ctx.host.ops_folded();
                }
                let mut it = outcomes.into_iter();
                for (via, ops) in jobs {
                    let outcomes = it.by_ref().take(ops.len()).collect();
                    let _ = ctx.events.send(Event::Submitted { via, ops, outcomes });
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the gossip store thread");
    }
    tx
}

#[allow(clippy::too_many_arguments)]
async fn core_loop<H: StoreHost>(
    ctx: Arc<Ctx<H>>,
    mut core: Core,
    mut rx: mpsc::UnboundedReceiver<Event>,
    submit: std::sync::mpsc::Sender<SubmitJob>,
    seeds: Vec<String>,
    status: Arc<Mutex<GossipStatus>>,
    local: Arc<Notify>,
    revoked: Revoked,
    udp: Arc<Mutex<UdpSent>>,
) {
    let mut conns: BTreeMap<PublicKey, quinn::Connection> = BTreeMap::new();
    let mut dialing: BTreeSet<String> = BTreeSet::new();
    let mut seed_keys: BTreeMap<String, PublicKey> = BTreeMap::new();
    let mut next_seed_dial = 0u64;
    let mut next_housekeeping = 0u64;
    loop {
        let now = now_ms();
        let wake = core.next_deadline().min(now + 20).max(now);
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let now = now_ms();
                match ev {
                    Event::Up { id, conn } => {
                        let max = conn.max_datagram_size().unwrap_or(0);
                        if let Some(old) = conns.insert(id.key, conn.clone())
                            && old.stable_id() != conn.stable_id()
                        {
                            old.close(quinn::VarInt::from_u32(close::SHUTDOWN), b"replaced");
                        }
                        dialing.remove(&id.addr);
                        udp.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .open
                            .insert(conn.stable_id(), conn.clone());
                        spawn_conn_tasks(ctx.clone(), id.key, conn);
                        core.peer_up(id, max, now);
                    }
                    Event::Down { key, stable_id } => {
                        let mut u = udp.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(c) = u.open.remove(&stable_id) {
                            let s = c.stats().udp_tx;
                            u.closed.0 += s.datagrams;
                            u.closed.1 += s.bytes;
                        }
                        drop(u);
                        if conns.get(&key).is_some_and(|c| c.stable_id() == stable_id) {
                            conns.remove(&key);
                            core.peer_down(&key, now);
                        }
                    }
                    Event::Datagram { from, bytes } => core.handle_datagram(from, &bytes, now),
                    Event::StreamOp { from, op } => core.handle_stream_op(from, op, now),
                    Event::Response { id, resp } => core.handle_response(id, resp, now),
                    Event::Submitted { via, ops, outcomes } => core.submitted(via, ops, outcomes, now),
                    Event::Dialed { seed, key } => {
                        dialing.remove(&seed);
                        if let Some(k) = key {
                            seed_keys.insert(seed, k);
                        }
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(wake - now)) => {}
            _ = local.notified() => {}
        }
        let now = now_ms();
        // Local appends (the API writes to the store directly).
        let me = ctx.me;
        let known = core.heads().get(&me).copied().unwrap_or(0);
        let fresh = ctx
            .host
            .with_store(|s| {
                let head = s.heads().get(&me).copied().unwrap_or(0);
                if head > known {
                    s.ops_of(&me, known + 1, head).unwrap_or_default()
                } else {
                    Vec::new()
                }
            })
            .unwrap_or_default();
        if !fresh.is_empty() {
            core.local_ops(fresh);
        }
        if now >= core.next_deadline() {
            core.tick(now);
        }
        if now >= next_seed_dial {
            next_seed_dial = now + 3_000;
            for s in &seeds {
                let connected = seed_keys.get(s).is_some_and(|k| conns.contains_key(k));
                if !connected && dialing.insert(s.clone()) {
                    tokio::spawn(dial(ctx.clone(), s.clone()));
                }
            }
        }
        if now >= next_housekeeping {
            next_housekeeping = now + 500;
            housekeeping(&ctx, &core, &mut conns, &revoked, &status);
        }
        while let Some(o) = core.poll_output() {
            match o {
                Output::Datagram { to, bytes } => match conns.get(&to) {
                    // Backpressure: never let quinn drop older queued datagrams; the path MTU
                    // may have shrunk since the core packed this one (PMTUD).
                    Some(c)
                        if c.datagram_send_buffer_space() >= bytes.len()
                            && c.max_datagram_size().is_some_and(|m| m >= bytes.len()) =>
                    {
                        if c.send_datagram(Bytes::from(bytes)).is_err() {
                            core.datagram_dropped();
                        }
                    }
                    Some(c) => {
                        core.datagram_dropped();
                        core.set_max_datagram(&to, c.max_datagram_size().unwrap_or(0));
                    }
                    None => core.datagram_dropped(),
                },
                Output::Stream { to, op } => {
                    if let Some(c) = conns.get(&to) {
                        tokio::spawn(send_stream_op(c.clone(), op));
                    }
                }
                Output::Request { to, id, req } => match conns.get(&to) {
                    Some(c) => {
                        tokio::spawn(request(ctx.clone(), c.clone(), id, req));
                    }
                    None => core.handle_response(id, None, now),
                },
                Output::Submit { via, ops } => {
                    let _ = submit.send((via, ops));
                }
                Output::Connect(id) => {
                    if !conns.contains_key(&id.key) && dialing.insert(id.addr.clone()) {
                        tokio::spawn(dial(ctx.clone(), id.addr));
                    }
                }
            }
        }
    }
}

/// Status snapshot and revocations.
fn housekeeping<H: StoreHost>(
    ctx: &Ctx<H>,
    core: &Core,
    conns: &mut BTreeMap<PublicKey, quinn::Connection>,
    revoked: &Revoked,
    status: &Mutex<GossipStatus>,
) {
    let set = revoked.read().map(|r| r.clone()).unwrap_or_default();
    let newly: Vec<PublicKey> = ctx
        .host
        .with_store(|s| {
            s.state()
                .revoked_servers()
                .filter(|k| !set.contains(k))
                .collect()
        })
        .unwrap_or_default();
    if !newly.is_empty() {
        if let Ok(mut r) = revoked.write() {
            r.extend(newly.iter().copied());
        }
        for k in newly {
            if let Some(c) = conns.remove(&k) {
                tracing::warn!(peer = %k, "server revoked: closing its gossip connection");
                c.close(
                    quinn::VarInt::from_u32(close::REVOKED),
                    b"your server certificate is revoked",
                );
            }
        }
    }
    let mut peers: Vec<PeerView> = core
        .members()
        .into_iter()
        .map(|(id, st)| PeerView {
            key: id.key.to_string(),
            addr: id.addr,
            status: st,
            connected: conns.contains_key(&id.key),
        })
        .collect();
    peers.sort_by(|a, b| a.key.cmp(&b.key));
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    s.peers = peers;
    s.counters = core.counters().clone();
}

async fn accept_loop<H: StoreHost>(ctx: Arc<Ctx<H>>) {
    while let Some(incoming) = ctx.endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "gossip handshake failed");
                    return;
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), accept_hello(&ctx, &conn)).await {
                Ok(Ok(id)) => {
                    let _ = ctx.events.send(Event::Up { id, conn });
                }
                Ok(Err((code, why))) => {
                    tracing::warn!(remote = %conn.remote_address(), reason = %why, "gossip peer refused");
                    conn.close(quinn::VarInt::from_u32(code), why.as_bytes());
                }
                Err(_) => conn.close(quinn::VarInt::from_u32(close::PROTOCOL), b"no hello"),
            }
        });
    }
}

type Refusal = (u32, String);

async fn accept_hello<H: StoreHost>(
    ctx: &Ctx<H>,
    conn: &quinn::Connection,
) -> Result<ServerId, Refusal> {
    let key = transport::peer_key(conn).ok_or((close::PROTOCOL, "no peer key".to_string()))?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| (close::PROTOCOL, format!("no hello stream: {e}")))?;
    let bytes = read_frame(&mut recv, wire::MAX_DATAGRAM_BYTES * 4)
        .await
        .map_err(|e| (close::PROTOCOL, e))?;
    let id = check_hello(ctx, key, &bytes)?;
    write_frame(&mut send, &own_hello(ctx))
        .await
        .map_err(|e| (close::PROTOCOL, e))?;
    let _ = send.finish();
    Ok(id)
}

/// Dials `addr`, exchanges Hellos, and reports the connection.
async fn dial<H: StoreHost>(ctx: Arc<Ctx<H>>, addr: String) {
    let key = match dial_inner(&ctx, &addr).await {
        Ok((id, conn)) => {
            let key = id.key;
            let _ = ctx.events.send(Event::Up { id, conn });
            Some(key)
        }
        Err(e) => {
            tracing::debug!(peer = %addr, error = %e, "gossip dial failed");
            None
        }
    };
    let _ = ctx.events.send(Event::Dialed { seed: addr, key });
}

async fn dial_inner<H: StoreHost>(
    ctx: &Ctx<H>,
    addr: &str,
) -> Result<(ServerId, quinn::Connection), String> {
    let sa = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let connecting = ctx
        .endpoint
        .connect(sa, transport::SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let key = transport::peer_key(&conn).ok_or("no peer key")?;
    if key == ctx.me {
        conn.close(quinn::VarInt::from_u32(close::SHUTDOWN), b"self");
        return Err("dialed ourselves".into());
    }
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &own_hello(ctx)).await?;
        let _ = send.finish();
        read_frame(&mut recv, wire::MAX_DATAGRAM_BYTES * 4).await
    };
    let bytes = match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let reason = conn
                .close_reason()
                .map(|r| r.to_string())
                .unwrap_or_default();
            return Err(format!("hello exchange failed: {e} {reason}"));
        }
        Err(_) => return Err("hello exchange timed out".into()),
    };
    match check_hello(ctx, key, &bytes) {
        Ok(id) => Ok((id, conn)),
        Err((code, why)) => {
            conn.close(quinn::VarInt::from_u32(code), why.as_bytes());
            Err(why)
        }
    }
}

fn own_hello<H: StoreHost>(ctx: &Ctx<H>) -> Vec<u8> {
    let heads = ctx
        .host
        .with_store(|s| wire::heads_to_wire(s.heads()))
        .unwrap_or_default();
    wire::encode(&Hello {
        version: wire::PROTOCOL_VERSION,
        cluster: wire::Blob(ctx.cluster.to_vec()),
        cert: wire::Blob(ctx.cert.clone()),
        gossip_addr: ctx.advertise.clone(),
        heads,
    })
}

/// Checks a peer's Hello against the TLS-authenticated `key` (see the module docs).
fn check_hello<H: StoreHost>(
    ctx: &Ctx<H>,
    key: PublicKey,
    bytes: &[u8],
) -> Result<ServerId, Refusal> {
    let h = wire::decode_hello(bytes).map_err(|e| (close::PROTOCOL, e.to_string()))?;
    if h.version != wire::PROTOCOL_VERSION {
        return Err((
            close::PROTOCOL,
            format!(
                "gossip protocol version {} (this server speaks {})",
                h.version,
                wire::PROTOCOL_VERSION
            ),
        ));
    }
    if h.cluster.0 != ctx.cluster {
        return Err((
            close::CLUSTER_MISMATCH,
            format!(
                "cluster id mismatch: peer {} has {}, this server {} (different root key or overlay configuration)",
                key,
                hex::encode(&h.cluster.0[..8]),
                hex::encode(&ctx.cluster[..8])
            ),
        ));
    }
    // One admission rule for every transport (trust::check_peer): revoked never; an admitted
    // server or the root with any root-signed certificate naming it (expiry was checked when it
    // was admitted); anyone else with a certificate valid now.
    let checked = ctx
        .host
        .with_store(|s| crate::trust::check_peer(s.state(), &key, &h.cert.0, now_ms()))
        .ok_or((close::SHUTDOWN, "shutting down".to_string()))?;
    checked.map_err(|e| match e {
        crate::trust::TrustError::Revoked(_) => {
            (close::REVOKED, format!("server {key} is revoked"))
        }
        e => (
            close::NOT_ADMITTED,
            format!("server {key} not admitted: {e}"),
        ),
    })?;
    Ok(ServerId {
        key,
        addr: h.gossip_addr,
        bump: 0,
    })
}

fn spawn_conn_tasks<H: StoreHost>(ctx: Arc<Ctx<H>>, key: PublicKey, conn: quinn::Connection) {
    let c = conn.clone();
    let cx = ctx.clone();
    tokio::spawn(async move {
        while let Ok(bytes) = c.read_datagram().await {
            if cx
                .events
                .send(Event::Datagram { from: key, bytes })
                .is_err()
            {
                return;
            }
        }
        let _ = cx.events.send(Event::Down {
            key,
            stable_id: c.stable_id(),
        });
    });
    let c = conn.clone();
    let cx = ctx.clone();
    tokio::spawn(async move {
        // One op per unidirectional stream (`Push::Streams`, the benchmark's naive baseline).
        while let Ok(mut recv) = c.accept_uni().await {
            let events = cx.events.clone();
            tokio::spawn(async move {
                if let Ok(op) = read_frame(&mut recv, wire::MAX_DATAGRAM_BYTES).await {
                    let _ = events.send(Event::StreamOp { from: key, op });
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(serve_stream(ctx.clone(), send, recv));
        }
    });
}

/// Sends one op on its own unidirectional stream; a failure is left to anti-entropy.
async fn send_stream_op(conn: quinn::Connection, op: Vec<u8>) {
    let Ok(mut send) = conn.open_uni().await else {
        return;
    };
    if write_frame(&mut send, &op).await.is_ok() {
        let _ = send.finish();
    }
}

async fn serve_stream<H: StoreHost>(
    ctx: Arc<Ctx<H>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(bytes) = read_frame(&mut recv, wire::MAX_DATAGRAM_BYTES * 4).await else {
        return;
    };
    let resp = match wire::decode_request(&bytes) {
        Ok(req) => {
            let host = ctx.host.clone();
            tokio::task::spawn_blocking(move || host.with_store(|s| super::core::answer(s, &req)))
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| Response::Refused("shutting down".into()))
        }
        Err(e) => Response::Refused(e.to_string()),
    };
    if write_frame(&mut send, &wire::encode(&resp)).await.is_ok() {
        let _ = send.finish();
    }
}

async fn request<H: StoreHost>(ctx: Arc<Ctx<H>>, conn: quinn::Connection, id: u64, req: Request) {
    let run = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &wire::encode(&req)).await?;
        let _ = send.finish();
        let bytes = read_frame(&mut recv, wire::MAX_STREAM_MESSAGE_BYTES).await?;
        wire::decode_response(&bytes).map_err(|e| e.to_string())
    };
    let resp = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(r)) => Some(r),
        _ => None,
    };
    let _ = ctx.events.send(Event::Response { id, resp });
}

async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), String> {
    let len = u32::try_from(bytes.len()).map_err(|_| "message too large".to_string())?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())
}

async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(format!("stream message of {len} bytes exceeds {max}"));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}
