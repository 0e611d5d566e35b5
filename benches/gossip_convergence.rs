//! Gossip convergence: time for one op to reach all N servers, and bytes sent per server per op,
//! for the default push strategy beside a naive send-to-everyone baseline, in the same run.
//!
//! **Processes.** Every server is its own OS process: this binary re-executes itself with
//! `GOSSIP_BENCH_CHILD` set (child mode), and the child runs one gossip node with its own store
//! (temp dir, real redb with fsync) and its own QUIC endpoint on 127.0.0.1, through the real driver
//! (`lemonade_nexus::gossip::node`, one current-thread tokio runtime plus the driver's store
//! thread); no WireGuard, no API. Every server is admitted by a root-signed certificate (checked
//! in each Hello) and appends its AdmitServer op first; each server dials the ones started before
//! it (SWIM then sees a full mesh). The parent drives the children over stdin/stdout lines:
//! `append` -> `appended <seq> <t_ns>`, `status` -> `status <connected> <origins>`,
//! `stats` -> `stats <udp datagrams> <udp bytes> <payload bytes>`, `hash` -> `hash <hex>`,
//! `quit`; and each child prints `arr <origin> <head> <t_ns>` as soon as ops from a peer are
//! committed to its store (from the driver's `StoreHost::ops_folded` hook, right after the commit).
//!
//! **Clock.** Timestamps are `clock_gettime(CLOCK_MONOTONIC)` in ns, one clock shared by all
//! processes of the machine. An op's time to all N = (latest commit time of the op among the
//! other N-1 servers) - (time its origin's local append was committed and the node notified).
//! Ops are sequential: a random server appends one op (a new customer node), the parent waits
//! until every other server committed it, then the next op. A second phase does the same with
//! bursts of 32 ops appended in one commit (time until every server holds the last of them,
//! bytes per op of the burst phase, `burst_*`): where packing many ops per datagram matters.
//!
//! **Strategies**, on fresh clusters one after the other in the same run:
//! * `default`: the product default (`CoreConfig::default().push`, `Push::All`): the origin packs
//!   its ops into QUIC datagrams up to `max_datagram_size()` and sends them to every peer;
//!   anti-entropy over streams repairs losses;
//! * `naive` (`Push::Streams`): what a straightforward implementation does: the origin opens one
//!   reliable unidirectional QUIC stream per op per peer, writes the op, finishes; receivers
//!   submit each op as it arrives. Same transport, stores, SWIM and anti-entropy;
//! * `fanout` (`Push::Fanout { k: 4 }`): the epidemic alternative.
//!
//! **Bytes** per server per op = UDP bytes the nodes' QUIC connections sent during the measured
//! window (quinn's `Connection::stats().udp_tx`: every packet with QUIC headers, encryption tags,
//! ACKs, keep-alives, SWIM, anti-entropy and stream frames; not the IP/UDP headers), summed over
//! all N servers and divided by N and by the number of ops. The window runs from just before the
//! first op to 600 ms after the last one converged, so background traffic (SWIM probes, 1 s
//! anti-entropy, 2 s keep-alives) is included; the background rate of the idle cluster, measured
//! over 1 s before the window, is reported alongside (`idle_udp_bytes_per_server_per_s`). The
//! gossip layer's own payload count (datagram bytes + stream op bytes, no QUIC overhead) is
//! reported too (`payload_bytes_per_server_per_op`).
//!
//! Prints one JSON line per (N, strategy) and writes `target/bench-results/gossip_convergence.json`:
//! `rows: [{servers, ops, p50_ms, p99_ms, bytes_per_server_per_op, naive_p50_ms, naive_p99_ms,
//! naive_bytes_per_server_per_op, fanout_*, ...}]` (`p*` and `bytes*` are the default strategy).
//! Knobs: `LEMONADE_BENCH_QUICK=1` (50 ops at N = 3 and 10, 60 ops at N = 30; 5 bursts, else 20),
//! `GOSSIP_BENCH_OPS=n` (every N), `GOSSIP_BENCH_SIZES=3,10` (which N).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lemonade_nexus::gossip::core::{CoreConfig, Push};
use lemonade_nexus::gossip::node::{self, Gossip, NodeConfig, StoreHost};
use lemonade_nexus::gossip::transport::SignFn;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::keys::PublicKey;
use lemonade_nexus::op::OpBody;
use lemonade_nexus::store::{Store, Submitted};
use lemonade_nexus::testkit;
use lemonade_nexus::tree::NodeId;
use lemonade_nexus::trust::{self, ServerCert, TrustOp};

const CHILD_ENV: &str = "GOSSIP_BENCH_CHILD";
const ROOT_SEED: u8 = 200;

/// CLOCK_MONOTONIC in ns: one clock for every process on this machine (`Instant` is opaque).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn push_arg(p: Push) -> String {
    match p {
        Push::All => "all".into(),
        Push::Streams => "streams".into(),
        Push::Fanout { k } => format!("fanout:{k}"),
    }
}

// ---------------------------------------------------------------------------- child: one server

/// The store of one child, and the heads it last announced (`arr` lines).
struct Host {
    store: Mutex<Store>,
    announced: Mutex<BTreeMap<PublicKey, u64>>,
}

impl StoreHost for Host {
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> Option<R> {
        Some(f(&mut self.store.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// Called by the driver's store thread right after received ops were committed.
    fn ops_folded(&self) {
        let t = mono_ns();
        let heads = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .heads()
            .clone();
        let mut seen = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        for (origin, head) in heads {
            if seen.get(&origin).is_none_or(|h| *h < head) {
                seen.insert(origin, head);
                println!("arr {origin} {head} {t}");
            }
        }
    }
}

fn child() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let seed: u8 = env("GOSSIP_BENCH_KEY").parse().expect("GOSSIP_BENCH_KEY");
    let push: Push = env("GOSSIP_BENCH_PUSH").parse().expect("GOSSIP_BENCH_PUSH");
    let seeds: Vec<String> = env("GOSSIP_BENCH_SEED")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let root = testkit::key(ROOT_SEED);
    let key = Arc::new(testkit::key(seed));
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
            name: format!("s{seed}"),
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
    let announced = Mutex::new(store.heads().clone());
    let host = Arc::new(Host {
        store: Mutex::new(store),
        announced,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let k = key.clone();
        let sign: SignFn = Arc::new(move |m| k.pair().sign(m).as_ref().to_vec());
        let cfg = NodeConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            advertise: None,
            seeds,
            core: CoreConfig {
                push,
                ..CoreConfig::default()
            },
            cert,
            rng_seed: seed as u64,
        };
        let gossip = node::start(host.clone(), me, sign, cfg).expect("gossip starts");
        let addr = gossip.local_addr().expect("bound address");
        println!("ready {addr}");
        // Commands arrive on stdin (read by a plain thread, EOF = quit).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut n = 0u64;
        while let Some(cmd) = rx.recv().await {
            // `append`: one op; `burst K`: K ops in one commit. Answers the last seq.
            let count: Option<usize> = match cmd.trim().strip_prefix("burst ") {
                Some(k) => Some(k.parse().expect("burst size")),
                None => (cmd.trim() == "append").then_some(1),
            };
            match (count, cmd.trim()) {
                (Some(k), _) => {
                    let batch: Vec<_> = (0..k)
                        .map(|_| {
                            n += 1;
                            let body =
                                testkit::create(NodeId::ROOT, &format!("s{seed}-{n}"), false);
                            (me, body, None)
                        })
                        .collect();
                    let seq = host.with_store(|s| {
                        let results = s
                            .append_local_batch(&key, batch, testkit::now_ms())
                            .expect("append");
                        match results.last() {
                            Some(Ok(Submitted::Appended { seq, .. })) => *seq,
                            other => panic!("not appended: {other:?}"),
                        }
                    });
                    let t = mono_ns();
                    gossip.notify_local();
                    println!("appended {} {t}", seq.expect("store"));
                }
                (None, "status") => {
                    let connected = gossip.status().peers.iter().filter(|p| p.connected).count();
                    let origins = host.with_store(|s| s.heads().len()).expect("store");
                    println!("status {connected} {origins}");
                }
                (None, "stats") => println!("stats {}", stats_line(&gossip)),
                (None, "hash") => {
                    let h = host.with_store(|s| s.state_hash()).expect("store");
                    println!("hash {}", hex::encode(h));
                }
                (None, "quit") => break,
                (None, other) => eprintln!("gossip bench child: unknown command {other:?}"),
            }
        }
        gossip.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
}

fn stats_line(g: &Gossip) -> String {
    let (datagrams, bytes) = g.udp_sent();
    format!("{datagrams} {bytes} {}", g.status().counters.bytes_sent)
}

// ---------------------------------------------------------------------------- parent

/// One child process; killed if still running when dropped (a failed run leaves nothing behind).
struct Proc {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
    key: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(index: usize, push: Push, seed_addr: &str, arrivals: Sender<(usize, String)>) -> Proc {
        let seed = index as u8 + 1;
        let mut child = Command::new(std::env::current_exe().expect("own executable"))
            .env(CHILD_ENV, "1")
            .env("GOSSIP_BENCH_KEY", seed.to_string())
            .env("GOSSIP_BENCH_PUSH", push_arg(push))
            .env("GOSSIP_BENCH_SEED", seed_addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a gossip child");
        let stdin = child.stdin.take().expect("child stdin");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, replies) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let sent = if let Some(rest) = line.strip_prefix("arr ") {
                    arrivals.send((index, rest.to_string())).is_ok()
                } else {
                    tx.send(line).is_ok()
                };
                if !sent {
                    break;
                }
            }
        });
        Proc {
            child,
            stdin,
            replies,
            key: testkit::key(seed).public().to_string(),
        }
    }

    /// Sends `cmd` and returns the words of the reply line starting with `expect`.
    fn ask(&mut self, cmd: &str, expect: &str) -> Vec<String> {
        writeln!(self.stdin, "{cmd}").expect("write to child");
        self.stdin.flush().expect("flush to child");
        self.wait_for(expect)
    }

    fn wait_for(&mut self, expect: &str) -> Vec<String> {
        let line = self
            .replies
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no {expect:?} reply from a child: {e}"));
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        assert_eq!(
            words.first().map(String::as_str),
            Some(expect),
            "child replied {line:?}"
        );
        words[1..].to_vec()
    }

    fn stats(&mut self) -> [u64; 3] {
        let w = self.ask("stats", "stats");
        [0, 1, 2].map(|i| w[i].parse().expect("number"))
    }
}

/// Commit times of ops at each server: (server, origin key) -> [(head, t_ns)] in order.
struct Arrivals {
    rx: Receiver<(usize, String)>,
    seen: HashMap<(usize, String), Vec<(u64, u64)>>,
}

impl Arrivals {
    /// When server `at` first held seq `seq` of `origin`.
    fn time_of(&self, at: usize, origin: &str, seq: u64) -> Option<u64> {
        self.seen
            .get(&(at, origin.to_string()))?
            .iter()
            .find(|(h, _)| *h >= seq)
            .map(|(_, t)| *t)
    }

    /// Absorbs arrival lines until `done` holds (or panics after `limit`).
    fn until(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, rest)) => {
                    let w: Vec<&str> = rest.split_whitespace().collect();
                    let (Some(origin), Some(head), Some(t)) = (w.first(), w.get(1), w.get(2))
                    else {
                        panic!("bad arrival line {rest:?}");
                    };
                    self.seen
                        .entry((at, origin.to_string()))
                        .or_default()
                        .push((head.parse().expect("head"), t.parse().expect("time")));
                }
                Err(RecvTimeoutError::Timeout) => panic!("not converged within {limit:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("children gone"),
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    udp_bytes: f64,
    udp_datagrams: f64,
    payload_bytes: f64,
    idle_udp_bytes_per_s: f64,
    setup_s: f64,
    /// Bursts of [`BURST`] ops in one commit: time until every server holds the last one.
    burst_p50_ms: f64,
    burst_p99_ms: f64,
    burst_udp_bytes: f64,
    burst_udp_datagrams: f64,
}

/// Ops per burst (one commit at one origin), in the burst phase.
const BURST: usize = 32;

/// `rounds` times: a random server runs `cmd` (`append` or `burst K`); waits until every other
/// server committed the last op; returns the sorted times (ms).
fn phase(procs: &mut [Proc], arrivals: &mut Arrivals, rounds: usize, cmd: &str) -> Vec<f64> {
    let n = procs.len();
    let mut lat = Vec::with_capacity(rounds);
    let mut pick = 7u64;
    for _ in 0..rounds {
        pick = pick
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (pick >> 33) as usize % n;
        let w = procs[i].ask(cmd, "appended");
        let seq: u64 = w[0].parse().expect("seq");
        let t0: u64 = w[1].parse().expect("time");
        let origin = procs[i].key.clone();
        let others: Vec<usize> = (0..n).filter(|j| *j != i).collect();
        arrivals.until(Duration::from_secs(30), |a| {
            others.iter().all(|j| a.time_of(*j, &origin, seq).is_some())
        });
        let last = others
            .iter()
            .filter_map(|j| arrivals.time_of(*j, &origin, seq))
            .max()
            .expect("n > 1");
        lat.push(last.saturating_sub(t0) as f64 / 1e6);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    lat
}

fn total(procs: &mut [Proc]) -> [u64; 3] {
    procs.iter_mut().fold([0; 3], |acc, p| {
        let s = p.stats();
        [acc[0] + s[0], acc[1] + s[1], acc[2] + s[2]]
    })
}

fn measure(n: usize, push: Push, ops: usize, bursts: usize) -> Measured {
    let started = Instant::now();
    let (atx, arx) = channel();
    let mut arrivals = Arrivals {
        rx: arx,
        seen: HashMap::new(),
    };
    // Each server is given the addresses of those started before it as seeds (a full mesh
    // at once, instead of waiting for SWIM to introduce 30 servers).
    let mut procs: Vec<Proc> = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    for i in 0..n {
        procs.push(Proc::spawn(i, push, &addrs.join(","), atx.clone()));
        addrs.push(procs[i].wait_for("ready")[0].clone());
    }
    drop(atx);
    // Everyone connected to everyone, every AdmitServer op everywhere.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let formed = procs.iter_mut().all(|p| {
            let w = p.ask("status", "status");
            w[0] == (n - 1).to_string() && w[1] == n.to_string()
        });
        if formed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster of {n} did not form in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let setup_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let idle0 = total(&mut procs);
    let idle_t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let before = total(&mut procs);
    let idle_udp_bytes_per_s =
        (before[1] - idle0[1]) as f64 / n as f64 / idle_t0.elapsed().as_secs_f64();

    let lat = phase(&mut procs, &mut arrivals, ops, "append");
    // Let the last packets (ACKs, forwards, anti-entropy) go out before reading the counters.
    std::thread::sleep(Duration::from_millis(600));
    let after = total(&mut procs);
    let burst_lat = phase(&mut procs, &mut arrivals, bursts, &format!("burst {BURST}"));
    std::thread::sleep(Duration::from_millis(600));
    let after_bursts = total(&mut procs);
    let hashes: Vec<Vec<String>> = procs.iter_mut().map(|p| p.ask("hash", "hash")).collect();
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "all servers hold the same state"
    );
    drop(procs);
    let per = |i: usize| (after[i] - before[i]) as f64 / n as f64 / ops as f64;
    let burst_ops = (bursts * BURST) as f64;
    let per_burst = |i: usize| (after_bursts[i] - after[i]) as f64 / n as f64 / burst_ops;
    Measured {
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        udp_datagrams: per(0),
        udp_bytes: per(1),
        payload_bytes: per(2),
        idle_udp_bytes_per_s,
        setup_s,
        burst_p50_ms: percentile(&burst_lat, 0.5),
        burst_p99_ms: percentile(&burst_lat, 0.99),
        burst_udp_bytes: per_burst(1),
        burst_udp_datagrams: per_burst(0),
    }
}

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let quick = std::env::var("LEMONADE_BENCH_QUICK").is_ok_and(|v| v == "1");
    let ops_env: Option<usize> = std::env::var("GOSSIP_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok());
    let sizes: Vec<usize> = std::env::var("GOSSIP_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![3, 10, 30]);
    let chosen = CoreConfig::default().push;
    let strategies = [
        ("default", chosen),
        ("naive", Push::Streams),
        ("fanout", Push::Fanout { k: 4 }),
    ];
    let mut rows = Vec::new();
    for &n in &sizes {
        let ops = ops_env.unwrap_or(match (quick, n >= 30) {
            (false, _) => 200,
            (true, false) => 50,
            (true, true) => 60,
        });
        let bursts = if quick { 5 } else { 20 };
        let mut row = serde_json::json!({ "servers": n, "ops": ops, "push": push_arg(chosen) });
        for (name, push) in strategies {
            let m = measure(n, push, ops, bursts);
            println!(
                "{}",
                serde_json::json!({
                    "bench": "gossip_convergence",
                    "servers": n,
                    "strategy": name,
                    "push": push_arg(push),
                    "ops": ops,
                    "p50_ms": m.p50_ms,
                    "p99_ms": m.p99_ms,
                    "udp_bytes_per_server_per_op": m.udp_bytes,
                    "udp_datagrams_per_server_per_op": m.udp_datagrams,
                    "payload_bytes_per_server_per_op": m.payload_bytes,
                    "idle_udp_bytes_per_server_per_s": m.idle_udp_bytes_per_s,
                    "setup_s": m.setup_s,
                    "burst_ops": BURST,
                    "bursts": bursts,
                    "burst_p50_ms": m.burst_p50_ms,
                    "burst_p99_ms": m.burst_p99_ms,
                    "burst_udp_bytes_per_server_per_op": m.burst_udp_bytes,
                    "burst_udp_datagrams_per_server_per_op": m.burst_udp_datagrams,
                })
            );
            let prefix = if name == "default" {
                String::new()
            } else {
                format!("{name}_")
            };
            let r = row.as_object_mut().expect("object");
            for (k, v) in [
                ("p50_ms", m.p50_ms),
                ("p99_ms", m.p99_ms),
                ("bytes_per_server_per_op", m.udp_bytes),
                ("udp_datagrams_per_server_per_op", m.udp_datagrams),
                ("payload_bytes_per_server_per_op", m.payload_bytes),
                ("idle_udp_bytes_per_server_per_s", m.idle_udp_bytes_per_s),
                ("burst_p50_ms", m.burst_p50_ms),
                ("burst_p99_ms", m.burst_p99_ms),
                ("burst_udp_bytes_per_server_per_op", m.burst_udp_bytes),
                (
                    "burst_udp_datagrams_per_server_per_op",
                    m.burst_udp_datagrams,
                ),
            ] {
                r.insert(format!("{prefix}{k}"), v.into());
            }
        }
        rows.push(row);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let summary = serde_json::json!({
        "clock": "CLOCK_MONOTONIC",
        "bytes": "quinn udp_tx bytes of all gossip connections, per server per op",
        "rows": rows,
    });
    let _ = std::fs::write(
        dir.join("gossip_convergence.json"),
        serde_json::to_string_pretty(&summary).expect("json"),
    );
}
