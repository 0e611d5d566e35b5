//! Programming N peers into an empty WireGuard device through our crate, beside `wg setconf` of
//! the same configuration on the same backend in the same run; and one incremental change (add
//! one peer, remove one, change one endpoint) on a device that already has N peers.
//!
//! Needs root. A plain `main` (not criterion): each measurement is a whole device programming.
//! Programming is timed in 3 rounds (1 with LEMONADE_BENCH_QUICK) alternating `wg setconf` and
//! ours, and each incremental change 15 times (5); medians are reported.
//!
//!   cargo bench --bench netlink_setconf                 # userspace (wireguard-go) on the host,
//!                                                       # then the kernel backend inside UML
//!   LN_BENCH_PEERS=1000,10000 cargo bench --bench ...   # choose N
//!   LEMONADE_BENCH_QUICK=1                              # N = 1,000 and 10,000, fewer repeats
//!
//! Results: printed, and written to target/bench-results/netlink_setconf.json as
//! `{"rows": [{"backend", "peers", "ours_ms", "wg_setconf_ms", "ratio", "incremental_ms", ...}]}`
//! (rows of the other backend already in the file are kept).
//!
//! Isolation: the measuring process re-executes itself inside a fresh network namespace
//! (`ip netns exec`), and the device's link stays down: nothing is ever sent to the endpoints
//! (192.0.2.0/24, TEST-NET-1) of the generated peers.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use lemonade_nexus_netlink::{
    DeviceConfig, DeviceDiff, Key, PeerChange, PeerConfig, PeerUpdate, WgBackend,
    diff::AllowedIpsChange,
    kernel::{KernelBackend, encode::Budget},
    model::{IpNet, PrivateKey},
    uapi::UapiBackend,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // cargo bench passes "--bench"; ignore it and anything else we do not know.
    let backend = args
        .windows(2)
        .find(|w| w[0] == "--backend")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| "userspace".into());
    if !is_root() {
        eprintln!("netlink_setconf: needs root (WireGuard devices, network namespaces); skipped");
        std::process::exit(2);
    }
    if std::env::var_os("LN_BENCH_INSIDE").is_none() {
        std::process::exit(outer(&backend));
    }
    let rows = match backend.as_str() {
        "userspace" => measure_all(&Userspace),
        "kernel" => measure_all(&Kernel),
        other => panic!("unknown backend {other}"),
    };
    write_rows(&backend, &rows);
}

/// Runs the measuring process in a fresh namespace; for the userspace backend, then also runs
/// the kernel backend inside User-Mode Linux when the harness is set up.
fn outer(backend: &str) -> i32 {
    let rc = in_netns(backend);
    if rc != 0 || backend != "userspace" || std::env::var_os("LN_BENCH_NO_UML").is_some() {
        return rc;
    }
    let runner = repo().join("tests/uml/run-in-uml.sh");
    if !runner.exists() {
        eprintln!("netlink_setconf: no tests/uml/run-in-uml.sh; kernel backend not measured");
        return rc;
    }
    let exe = std::env::current_exe().expect("current exe");
    println!("\n== kernel backend, inside User-Mode Linux ==");
    let status = Command::new("bash")
        .arg(&runner)
        .args(["-m", "2G", "-t", "3000", "--"])
        .arg(exe)
        .args(["--backend", "kernel"])
        .status()
        .expect("run-in-uml.sh");
    if status.success() {
        0
    } else {
        status.code().unwrap_or(1)
    }
}

fn in_netns(backend: &str) -> i32 {
    let ns = format!("ln-bench-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip");
    assert!(ok.success(), "ip netns add {ns}");
    let exe = std::env::current_exe().expect("current exe");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(["--backend", backend])
        .env("LN_BENCH_INSIDE", "1")
        .env("LN_BENCH_OUTER_PID", std::process::id().to_string())
        .status()
        .expect("ip netns exec");
    // A measurement that failed half-way may leave a wireguard-go daemon (ours) in the
    // namespace; it would keep the namespace alive after `ip netns del`. Stop what is left.
    let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
    for pid in pids
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .split_whitespace()
    {
        let _ = Command::new("kill").arg(pid).status();
    }
    let _ = std::fs::remove_file(format!("/var/run/wireguard/lnb{}.sock", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    status.code().unwrap_or(1)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn peer_counts() -> Vec<usize> {
    if let Ok(s) = std::env::var("LN_BENCH_PEERS") {
        return s.split(',').filter_map(|n| n.trim().parse().ok()).collect();
    }
    if std::env::var_os("LEMONADE_BENCH_QUICK").is_some() {
        vec![1_000, 10_000]
    } else {
        vec![1_000, 10_000, 50_000]
    }
}

/// How a backend is built (inside the namespace).
trait Flavor {
    type B: WgBackend;
    const NAME: &'static str;
    fn make(&self) -> impl std::future::Future<Output = Self::B>;
}

struct Userspace;
impl Flavor for Userspace {
    type B = UapiBackend;
    const NAME: &'static str = "userspace";
    async fn make(&self) -> UapiBackend {
        UapiBackend::new().with_io_timeout(Duration::from_secs(3000))
    }
}

/// The kernel backend with its default 4 KiB message budget (what wg(8) uses too).
struct Kernel;
impl Flavor for Kernel {
    type B = KernelBackend;
    const NAME: &'static str = "kernel";
    async fn make(&self) -> KernelBackend {
        KernelBackend::connect(Budget::default())
            .await
            .expect("kernel WireGuard backend")
    }
}

/// A deterministic pseudo-random stream (splitmix64), so every run programs the same keys.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn key(&mut self) -> Key {
        let mut k = [0u8; 32];
        for chunk in k.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        Key(k)
    }
}

/// Peer `i`: a random key, allowed IP 10.x.y.z/32 (unique per i), endpoint in TEST-NET-1.
fn peer(rng: &mut Rng, i: usize) -> PeerConfig {
    let ip = Ipv4Addr::from(0x0A00_0000u32 + 1 + i as u32);
    PeerConfig {
        public_key: rng.key(),
        preshared_key: None,
        endpoint: Some(SocketAddr::from((
            Ipv4Addr::new(192, 0, 2, (i % 250) as u8 + 1),
            51820 + (i % 1000) as u16,
        ))),
        persistent_keepalive: None,
        allowed_ips: vec![IpNet::new(ip.into(), 32).expect("prefix")],
    }
}

fn config(n: usize) -> DeviceConfig {
    let mut rng = Rng(n as u64);
    DeviceConfig {
        private_key: Some(PrivateKey(rng.key())),
        listen_port: Some(51820),
        fwmark: None,
        peers: (0..n).map(|i| peer(&mut rng, i)).collect(),
    }
}

/// The same configuration in `wg setconf` syntax.
fn wg_conf(cfg: &DeviceConfig) -> String {
    let mut s = String::with_capacity(cfg.peers.len() * 160);
    let pk = cfg.private_key.as_ref().expect("key");
    let _ = writeln!(s, "[Interface]\nPrivateKey = {}", pk.0);
    if let Some(p) = cfg.listen_port {
        let _ = writeln!(s, "ListenPort = {p}");
    }
    for p in &cfg.peers {
        let _ = writeln!(s, "\n[Peer]\nPublicKey = {}", p.public_key);
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "Endpoint = {ep}");
        }
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(s, "AllowedIPs = {}", ips.join(", "));
    }
    s
}

struct Row {
    peers: usize,
    ours_ms: f64,
    wg_setconf_ms: f64,
    add_ms: f64,
    remove_ms: f64,
    endpoint_ms: f64,
    reconcile_add_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn measure_all<F: Flavor>(flavor: &F) -> Vec<Row> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let mut rows = Vec::new();
    println!("backend: {}", F::NAME);
    println!(
        "{:>7} {:>12} {:>14} {:>7} {:>9} {:>10} {:>12} {:>15}",
        "peers",
        "ours ms",
        "wg setconf ms",
        "ratio",
        "add ms",
        "remove ms",
        "endpoint ms",
        "reconcile+1 ms"
    );
    for n in peer_counts() {
        let row = rt.block_on(measure(flavor, n));
        println!(
            "{:>7} {:>12.1} {:>14.1} {:>7.3} {:>9.3} {:>10.3} {:>12.3} {:>15.1}",
            row.peers,
            row.ours_ms,
            row.wg_setconf_ms,
            row.ours_ms / row.wg_setconf_ms,
            row.add_ms,
            row.remove_ms,
            row.endpoint_ms,
            row.reconcile_add_ms
        );
        rows.push(row);
    }
    rows
}

async fn measure<F: Flavor>(flavor: &F, n: usize) -> Row {
    let b = flavor.make().await;
    // Named after the outer process, which removes the socket if this one dies half-way.
    let ifname = format!(
        "lnb{}",
        std::env::var("LN_BENCH_OUTER_PID").unwrap_or_default()
    );
    let cfg = config(n);
    let repeats = if quick() { 5 } else { 15 };

    // Programming an empty device, `rounds` times each, alternating wg setconf and ours so that
    // load from the rest of the machine hits both alike; the medians are reported.
    let rounds = if quick() { 1 } else { 3 };
    let file = std::env::temp_dir().join(format!("{ifname}.conf"));
    std::fs::write(&file, wg_conf(&cfg)).expect("write conf");
    let (mut wg_times, mut our_times) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // wg setconf of the same configuration into a fresh device.
        b.ensure_device(&ifname).await.expect("ensure_device");
        let t = Instant::now();
        let st = Command::new("wg")
            .arg("setconf")
            .arg(&ifname)
            .arg(&file)
            .status()
            .expect("wg");
        wg_times.push(ms(t.elapsed()));
        assert!(st.success(), "wg setconf failed");
        let got = b.get(&ifname).await.expect("get").peers.len();
        assert_eq!(got, n, "wg setconf programmed N");
        b.delete_device(&ifname).await.expect("delete");

        // Ours: the controller's path, reconcile (dump of the empty device, diff, apply).
        b.ensure_device(&ifname).await.expect("ensure_device");
        let t = Instant::now();
        let d = b.reconcile(&ifname, &cfg).await.expect("reconcile");
        our_times.push(ms(t.elapsed()));
        assert_eq!(d.peers.len(), n);
        let got = b.get(&ifname).await.expect("get").peers.len();
        assert_eq!(got, n, "we programmed N");
        if round + 1 < rounds {
            b.delete_device(&ifname).await.expect("delete");
        }
    }
    let _ = std::fs::remove_file(&file);

    // Incremental changes on the device with N peers: the controller knows the change from the
    // store, so it applies a one-peer diff (no dump). Each is undone untimed.
    let mut rng = Rng(0xfeed + n as u64);
    let (mut add, mut remove, mut endpoint) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..repeats {
        let extra = peer(&mut rng, n + r);
        let add_diff = one(PeerChange::Add(extra.clone()));
        let t = Instant::now();
        b.apply(&ifname, &add_diff).await.expect("add");
        add.push(ms(t.elapsed()));
        b.apply(&ifname, &one(PeerChange::Remove(extra.public_key)))
            .await
            .expect("undo");

        let victim = &cfg.peers[(r * 7919) % n];
        let t = Instant::now();
        b.apply(&ifname, &one(PeerChange::Remove(victim.public_key)))
            .await
            .expect("remove");
        remove.push(ms(t.elapsed()));
        b.apply(&ifname, &one(PeerChange::Add(victim.clone())))
            .await
            .expect("undo");

        let moved = PeerUpdate {
            public_key: victim.public_key,
            preshared_key: None,
            endpoint: Some(SocketAddr::from((
                Ipv4Addr::new(192, 0, 2, 254),
                40000 + r as u16,
            ))),
            persistent_keepalive: None,
            allowed_ips: AllowedIpsChange::Unchanged,
        };
        let t = Instant::now();
        b.apply(&ifname, &one(PeerChange::Update(moved)))
            .await
            .expect("endpoint");
        endpoint.push(ms(t.elapsed()));
    }
    // For comparison: the same "add one peer" through a full reconcile (dump of N peers + diff).
    let mut plus_one = cfg.clone();
    plus_one.peers.push(peer(&mut rng, n + repeats));
    let t = Instant::now();
    let d = b.reconcile(&ifname, &plus_one).await.expect("reconcile +1");
    let reconcile_add = t.elapsed();
    assert!(!d.peers.is_empty());
    b.delete_device(&ifname).await.expect("delete");

    Row {
        peers: n,
        ours_ms: median(our_times),
        wg_setconf_ms: median(wg_times),
        add_ms: median(add),
        remove_ms: median(remove),
        endpoint_ms: median(endpoint),
        reconcile_add_ms: ms(reconcile_add),
    }
}

fn quick() -> bool {
    std::env::var_os("LEMONADE_BENCH_QUICK").is_some()
}

fn one(change: PeerChange) -> DeviceDiff {
    DeviceDiff {
        peers: vec![change],
        ..DeviceDiff::default()
    }
}

fn write_rows(backend: &str, rows: &[Row]) {
    let dir = repo().join("target/bench-results");
    std::fs::create_dir_all(&dir).expect("bench-results dir");
    let path = dir.join("netlink_setconf.json");
    let mut doc: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({ "rows": [] }));
    let mut kept: Vec<serde_json::Value> = doc["rows"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["backend"] != backend)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for r in rows {
        kept.push(serde_json::json!({
            "backend": backend,
            "peers": r.peers,
            "ours_ms": r.ours_ms,
            "wg_setconf_ms": r.wg_setconf_ms,
            "ratio": r.ours_ms / r.wg_setconf_ms,
            // The slowest of the three one-peer changes (medians), applied as a diff.
            "incremental_ms": r.add_ms.max(r.remove_ms).max(r.endpoint_ms),
            "add_ms": r.add_ms,
            "remove_ms": r.remove_ms,
            "endpoint_ms": r.endpoint_ms,
            "reconcile_add_ms": r.reconcile_add_ms,
        }));
    }
    doc["rows"] = serde_json::Value::Array(kept);
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).expect("json")).expect("write json");
    println!("wrote {}", path.display());
}
