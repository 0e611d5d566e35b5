//! Join throughput and latency through the public API (issue 4), beside the `GET /api/health`
//! throughput measured in the same run as the in-run reference.
//!
//! * `api/health`: one `GET /api/health` through the actix service in-process (routing,
//!   rate-limit middleware, JSON).
//! * `api/join64`: 64 joins in flight at once (64 clients, each with a fresh key and a proof for a
//!   fresh challenge obtained before the timing), through the real handlers in-process: proof
//!   check, join plan, the group committer (joins waiting together share one redb commit,
//!   `Durability::Immediate`), token. Throughput is joins/s; the per-join latencies of every
//!   measured batch are collected and their p50/p99 printed at the end.
//! * `tls/health`, `tls/join64`: the same over real HTTPS on 127.0.0.1 (actix `HttpServer`, 2
//!   workers, the API's rustls config; the pinned client opens one TCP connection and does one TLS
//!   handshake per request). Client and server share the machine's cores.
//!
//! Not included (so this is NOT yet the full figure): WireGuard peer programming (the
//! server runs without a dataplane, so a join does not wait for the reconciler). The state grows
//! by 64 devices per batch (join scans the tree for the key): `api/join64` starts again from a
//! fresh store every 1,024 joins so runs compare; `tls/join64` keeps one store (~1,000 joins).
//!
//! Run: `cargo bench -j2 --bench api_join` (add `-- --quick` for a short run).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, test};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lemonade_nexus::api::auth::{ChallengeResponse, make_proof};
use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::api::join::Registration;
use lemonade_nexus::api::{self, ApiState};
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::testkit;
use lemonade_nexus::tls::{self, JoinUrl};
use serde_json::json;

const CLIENTS: usize = 64;
/// Joins after which the in-process join bench starts again from a fresh store.
const STATE_RESET: u64 = 1024;

fn state(dir: &std::path::Path) -> Arc<ApiState> {
    let server = NodeKey::from_seed(&[1; 32]);
    Arc::new(testkit::genesis_api_state(
        dir,
        server,
        Registration::Open,
        None,
        IpamConfig::default(),
    ))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn key(n: u64) -> NodeKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    NodeKey::from_seed(&seed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let st = state(dir.path());
    let sys = actix_web::rt::System::new();
    let app = sys.block_on(test::init_service(
        App::new().configure(api::public(st.clone())),
    ));
    let mut g = c.benchmark_group("api");

    g.throughput(Throughput::Elements(1));
    g.bench_function("health", |b| {
        b.iter(|| {
            sys.block_on(async {
                let req = test::TestRequest::get().uri("/api/health").to_request();
                let resp = test::call_service(&app, req).await;
                assert!(resp.status().is_success());
            })
        })
    });

    let latencies = Mutex::new(Vec::<Duration>::new());
    let mut next_key = 0u64;
    // A fresh store every STATE_RESET joins (untimed), so every run measures joins into a state
    // of the same size range (0..STATE_RESET devices) however many iterations criterion picks.
    let mut current = None;
    g.throughput(Throughput::Elements(CLIENTS as u64));
    g.sample_size(10);
    g.bench_function("join64", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next_key.is_multiple_of(STATE_RESET) {
                    current = None; // drop the old app and store first (the store is locked)
                    let dir = tempfile::tempdir().expect("tmp");
                    let st = state(dir.path());
                    let app =
                        sys.block_on(test::init_service(App::new().configure(api::public(st))));
                    current = Some((app, dir));
                }
                let (app, _) = current.as_ref().expect("app");
                // Untimed: 64 fresh keys, each with a proof for its own fresh challenge.
                let bodies: Vec<_> = (0..CLIENTS)
                    .map(|_| {
                        next_key += 1;
                        let k = key(next_key);
                        let c: ChallengeResponse = sys.block_on(async {
                            let req = test::TestRequest::post()
                                .uri("/api/auth/challenge")
                                .set_json(json!({ "pubkey": k.public().to_string() }))
                                .to_request();
                            test::call_and_read_body_json(app, req).await
                        });
                        let server = c.server_key.parse().expect("server key");
                        let proof =
                            make_proof(k.pair(), &c.challenge().expect("c"), server, now_ms());
                        let mut wg = [0u8; 32];
                        wg[..8].copy_from_slice(&next_key.to_le_bytes());
                        wg[8] = 0xee;
                        json!({ "proof": proof, "wg_pubkey": STANDARD.encode(wg) })
                    })
                    .collect();
                let start = Instant::now();
                let lat = sys.block_on(async {
                    let joins = bodies.into_iter().map(|body| async move {
                        let t = Instant::now();
                        let req = test::TestRequest::post()
                            .uri("/api/join")
                            .set_json(body)
                            .to_request();
                        let resp = test::call_service(app, req).await;
                        assert!(resp.status().is_success(), "{}", resp.status());
                        t.elapsed()
                    });
                    futures_join_all(joins).await
                });
                total += start.elapsed();
                latencies.lock().expect("lock").extend(lat);
            }
            total
        })
    });
    g.finish();

    print_latencies("api/join64", latencies.into_inner().expect("lock"));
}

/// The same measure over real HTTPS: an actix `HttpServer` (2 workers) with the API's rustls
/// configuration on 127.0.0.1, and the project's pinned client (one TCP connection and TLS
/// handshake per request, as a joining device does). The client runs in this process, on the
/// same 2 cores as the server.
fn bench_tls(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let st = state(dir.path());
    let cert = tls::load_or_generate(None, None, dir.path(), &["localhost".into()]).expect("cert");
    let tls_cfg = tls::server_config(&cert).expect("tls config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    let server_state = st.clone();
    let server_thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let srv = actix_web::HttpServer::new(move || {
                App::new().configure(api::public(server_state.clone()))
            })
            .workers(2)
            .disable_signals()
            .listen_rustls_0_23(listener, tls_cfg)
            .expect("listen")
            .run();
            tx.send(srv.handle()).expect("send handle");
            srv.await.expect("server");
        })
    });
    let handle = rx.recv().expect("server started");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let client = PinnedClient::new(JoinUrl {
        host: "127.0.0.1".into(),
        port,
        pin: cert.pin,
    })
    .expect("client");

    let mut g = c.benchmark_group("tls");
    g.throughput(Throughput::Elements(1));
    g.bench_function("health", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = client.get("/api/health").await.expect("health");
                assert_eq!(r.status, 200);
            })
        })
    });

    let latencies = Mutex::new(Vec::<Duration>::new());
    let mut next_key = 1u64 << 40; // distinct from the in-process group's keys
    g.throughput(Throughput::Elements(CLIENTS as u64));
    g.sample_size(10);
    g.bench_function("join64", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Untimed: 64 fresh keys, each with a proof for its own fresh challenge.
                let bodies: Vec<_> = (0..CLIENTS)
                    .map(|_| {
                        next_key += 1;
                        let k = key(next_key);
                        let proof = rt.block_on(client.proof(&k)).expect("proof");
                        let mut wg = [0u8; 32];
                        wg[..8].copy_from_slice(&next_key.to_le_bytes());
                        wg[8] = 0xee;
                        json!({ "proof": proof, "wg_pubkey": STANDARD.encode(wg) })
                    })
                    .collect();
                let start = Instant::now();
                let lat = rt.block_on(async {
                    let joins = bodies.into_iter().map(|body| {
                        let client = &client;
                        async move {
                            let t = Instant::now();
                            let r = client.post("/api/join", &body).await.expect("join");
                            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                            t.elapsed()
                        }
                    });
                    futures_join_all(joins).await
                });
                total += start.elapsed();
                latencies.lock().expect("lock").extend(lat);
            }
            total
        })
    });
    g.finish();
    print_latencies("tls/join64", latencies.into_inner().expect("lock"));
    rt.block_on(handle.stop(true));
    server_thread.join().expect("server thread");
}

fn print_latencies(name: &str, mut l: Vec<Duration>) {
    l.sort();
    if !l.is_empty() {
        println!(
            "{name} latency over {} joins: p50 {:.2} ms, p99 {:.2} ms",
            l.len(),
            percentile(&l, 0.50).as_secs_f64() * 1e3,
            percentile(&l, 0.99).as_secs_f64() * 1e3
        );
    }
}

/// Runs the futures concurrently on the current task (no extra dependency).
async fn futures_join_all<F: std::future::Future<Output = Duration>>(
    futs: impl Iterator<Item = F>,
) -> Vec<Duration> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out = vec![None; set.len()];
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

criterion_group!(benches, bench, bench_tls);
criterion_main!(benches);
