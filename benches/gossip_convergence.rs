//! Gossip convergence: time for one op to reach all N servers, and bytes sent per server per op.
//!
//! N = 3, 10, 30 gossip nodes, each with its own store (temp dir, real redb with fsync), its own
//! QUIC endpoint on 127.0.0.1 and the real driver (`lemonade_nexus::gossip::node`): no WireGuard,
//! no API. All nodes run as tasks in this process (2 tokio workers, one store thread each).
//! Every server is admitted by a root-signed certificate (checked in each Hello) and appends its
//! AdmitServer op first. Then, 200 times: a random server appends one op (a new customer node),
//! and the time until every server's store holds it is recorded (polled every 0.5 ms).
//!
//! Both push strategies run in the same process, one after the other on fresh clusters: `all`
//! (the default and the send-to-everyone baseline the issue names: the origin sends each op to
//! every peer, nobody forwards; anti-entropy repairs losses) and `fanout:4` (epidemic: the origin
//! and every receiver forward to 4 random peers). "Bytes per server per op" counts the gossip
//! datagram bytes (pushed ops and SWIM) sent during the measured window, divided by N and by the
//! number of ops (anti-entropy stream bytes are not included).
//!
//! Prints one JSON line per (N, strategy) and writes `target/bench-results/gossip_convergence.json`
//! (`rows: [{servers, p50_ms, p99_ms, bytes_per_server_per_op, naive_p50_ms, naive_p99_ms,
//! naive_bytes_per_server_per_op, fanout_p50_ms, fanout_p99_ms, fanout_bytes_per_server_per_op}]`;
//! `p*` is the default strategy, `naive_*` the send-to-everyone baseline — the same strategy, run
//! separately, so its ratio shows the run-to-run spread — and `fanout_*` the epidemic
//! alternative). Knobs: `LEMONADE_BENCH_QUICK=1` (50 ops, N = 3 and 10), `GOSSIP_BENCH_OPS=n`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lemonade_nexus::gossip::core::{CoreConfig, Push};
use lemonade_nexus::gossip::node::{self, Gossip, NodeConfig};
use lemonade_nexus::gossip::transport::SignFn;
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::op::OpBody;
use lemonade_nexus::store::Store;
use lemonade_nexus::testkit;
use lemonade_nexus::tree::NodeId;
use lemonade_nexus::trust::{self, ServerCert, TrustOp};

struct Server {
    key: Arc<NodeKey>,
    store: Arc<Mutex<Store>>,
    gossip: Gossip,
    _dir: tempfile::TempDir,
}

async fn cluster(n: usize, push: Push, base: u8) -> Vec<Server> {
    let root = testkit::key(200);
    let mut servers: Vec<Server> = Vec::new();
    let mut seed_addr: Option<String> = None;
    for i in 0..n {
        let key = Arc::new(testkit::key(base + i as u8));
        let me = key.public();
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::create(
            &dir.path().join("state.redb"),
            root.public(),
            IpamConfig::default(),
        )
        .expect("store");
        let cert = trust::seal_server_cert(
            root.pair(),
            &ServerCert {
                server: me,
                name: format!("s{i}"),
                issued_at_ms: testkit::now_ms() - 1000,
                expires_at_ms: 0,
            },
        );
        store
            .append_local(
                &key,
                me,
                OpBody::Trust(TrustOp::AdmitServer { cert: cert.clone() }),
                None,
                testkit::now_ms(),
            )
            .expect("admit");
        let store = Arc::new(Mutex::new(store));
        let k = key.clone();
        let sign: SignFn = Arc::new(move |m| k.pair().sign(m).as_ref().to_vec());
        let cfg = NodeConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            advertise: None,
            seeds: seed_addr.iter().cloned().collect(),
            core: CoreConfig {
                push,
                ..CoreConfig::default()
            },
            cert,
            rng_seed: i as u64 + 1,
        };
        let gossip = node::start(store.clone(), me, sign, cfg).expect("gossip starts");
        if seed_addr.is_none() {
            seed_addr = gossip.local_addr().map(|a| a.to_string());
        }
        servers.push(Server {
            key,
            store,
            gossip,
            _dir: dir,
        });
    }
    // Everyone connected to everyone, and every AdmitServer op everywhere.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected = servers.iter().all(|s| {
            s.gossip
                .status()
                .peers
                .iter()
                .filter(|p| p.connected)
                .count()
                == n - 1
        });
        let replicated = servers
            .iter()
            .all(|s| s.store.lock().expect("store lock").heads().len() == n);
        if connected && replicated {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster of {n} did not form within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    servers
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    bytes_per_server_per_op: f64,
}

async fn measure(n: usize, push: Push, ops: usize, base: u8) -> Measured {
    let servers = cluster(n, push, base).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bytes_before: u64 = servers
        .iter()
        .map(|s| s.gossip.status().counters.bytes_sent)
        .sum();
    let mut lat = Vec::with_capacity(ops);
    let mut pick = 7u64;
    for k in 0..ops {
        pick = pick
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (pick >> 33) as usize % n;
        let s = &servers[i];
        let me = s.key.public();
        let t0 = Instant::now();
        let seq = {
            let mut st = s.store.lock().expect("store lock");
            match st
                .append_local(
                    &s.key,
                    me,
                    testkit::create(NodeId::ROOT, &format!("b{base}-{k}"), false),
                    None,
                    testkit::now_ms(),
                )
                .expect("append")
            {
                lemonade_nexus::store::Submitted::Appended { seq, .. } => seq,
                other => panic!("not appended: {other:?}"),
            }
        };
        s.gossip.notify_local();
        loop {
            let all = servers.iter().all(|r| {
                r.store
                    .lock()
                    .expect("store lock")
                    .heads()
                    .get(&me)
                    .is_some_and(|h| *h >= seq)
            });
            if all {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "op did not reach all servers in 30 s"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // Let the last datagrams and forwards settle before reading the byte counters.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let bytes_after: u64 = servers
        .iter()
        .map(|s| s.gossip.status().counters.bytes_sent)
        .sum();
    for s in &servers {
        s.gossip.shutdown();
    }
    let hash = servers[0].store.lock().expect("store lock").state_hash();
    assert!(
        servers
            .iter()
            .all(|s| s.store.lock().expect("store lock").state_hash() == hash),
        "all servers hold the same state"
    );
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    Measured {
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        bytes_per_server_per_op: (bytes_after - bytes_before) as f64 / n as f64 / ops as f64,
    }
}

fn main() {
    let quick = std::env::var("LEMONADE_BENCH_QUICK").is_ok_and(|v| v == "1");
    let ops: usize = std::env::var("GOSSIP_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 50 } else { 200 });
    let sizes: &[usize] = if quick { &[3, 10] } else { &[3, 10, 30] };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let chosen = CoreConfig::default().push;
    let fanout = Push::Fanout { k: 4 };
    let mut rows = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        let base = 1 + (round as u8) * 70;
        let ours = rt.block_on(measure(n, chosen, ops, base));
        let naive = rt.block_on(measure(n, Push::All, ops, base));
        let epidemic = rt.block_on(measure(n, fanout, ops, base));
        for (name, push, m) in [
            ("default", chosen, &ours),
            ("naive_send_to_everyone", Push::All, &naive),
            ("fanout", fanout, &epidemic),
        ] {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "gossip_convergence",
                    "servers": n,
                    "strategy": name,
                    "push": format!("{push:?}"),
                    "ops": ops,
                    "p50_ms": m.p50_ms,
                    "p99_ms": m.p99_ms,
                    "bytes_per_server_per_op": m.bytes_per_server_per_op,
                })
            );
        }
        rows.push(serde_json::json!({
            "servers": n,
            "push": format!("{chosen:?}"),
            "p50_ms": ours.p50_ms,
            "p99_ms": ours.p99_ms,
            "bytes_per_server_per_op": ours.bytes_per_server_per_op,
            "naive_p50_ms": naive.p50_ms,
            "naive_p99_ms": naive.p99_ms,
            "naive_bytes_per_server_per_op": naive.bytes_per_server_per_op,
            "fanout_p50_ms": epidemic.p50_ms,
            "fanout_p99_ms": epidemic.p99_ms,
            "fanout_bytes_per_server_per_op": epidemic.bytes_per_server_per_op,
        }));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let summary = serde_json::json!({ "ops": ops, "rows": rows });
    let _ = std::fs::write(
        dir.join("gossip_convergence.json"),
        serde_json::to_string_pretty(&summary).expect("json"),
    );
}
