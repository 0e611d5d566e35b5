//! Gossip over real QUIC on 127.0.0.1 (no WireGuard, no API): who may connect.
//!
//! A server admitted by a root-signed certificate connects and replicates; a server of another
//! cluster (other root), one presenting a certificate for another key, and one without any
//! certificate that the state does not know are all refused and never see an op.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lemonade_nexus::gossip::core::CoreConfig;
use lemonade_nexus::gossip::node::{self, Gossip, NodeConfig};
use lemonade_nexus::gossip::transport::SignFn;
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::keys::PublicKey;
use lemonade_nexus::store::Store;
use lemonade_nexus::testkit;
use lemonade_nexus::tree::NodeId;
use lemonade_nexus::trust::{self, ServerCert};

struct Server {
    key: Arc<NodeKey>,
    store: Arc<Mutex<Store>>,
    gossip: Gossip,
    _dir: tempfile::TempDir,
}

fn cert_for(root: &NodeKey, server: PublicKey) -> Vec<u8> {
    trust::seal_server_cert(
        root.pair(),
        &ServerCert {
            server,
            name: "srv".into(),
            issued_at_ms: testkit::now_ms() - 1000,
            expires_at_ms: 0,
        },
    )
}

/// A gossip node for `key` in the cluster of `root`, presenting `cert`, dialling `seeds`.
fn server(key: NodeKey, root: PublicKey, cert: Vec<u8>, seeds: Vec<String>) -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) =
        Store::create(&dir.path().join("state.redb"), root, IpamConfig::default()).expect("store");
    let store = Arc::new(Mutex::new(store));
    let key = Arc::new(key);
    let k = key.clone();
    let sign: SignFn = Arc::new(move |m| k.pair().sign(m).as_ref().to_vec());
    let gossip = node::start(
        store.clone(),
        key.public(),
        sign,
        NodeConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            advertise: None,
            seeds,
            core: CoreConfig::default(),
            cert,
            rng_seed: 1,
        },
    )
    .expect("gossip starts");
    Server {
        key,
        store,
        gossip,
        _dir: dir,
    }
}

fn addr(s: &Server) -> String {
    s.gossip.local_addr().expect("bound").to_string()
}

fn connected(s: &Server) -> usize {
    s.gossip
        .status()
        .peers
        .iter()
        .filter(|p| p.connected)
        .count()
}

/// Appends one op of `s`'s own (a customer node; its effect does not matter here).
fn local_op(s: &Server, name: &str) {
    let me = s.key.public();
    s.store
        .lock()
        .expect("lock")
        .append_local(
            &s.key,
            me,
            testkit::create(NodeId::ROOT, name, false),
            None,
            testkit::now_ms(),
        )
        .expect("append");
    s.gossip.notify_local();
}

fn head_of(s: &Server, origin: &PublicKey) -> u64 {
    s.store
        .lock()
        .expect("lock")
        .heads()
        .get(origin)
        .copied()
        .unwrap_or(0)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admitted_servers_of_the_same_cluster_connect() {
    let root = testkit::key(100);
    let a = server(
        testkit::key(1),
        root.public(),
        cert_for(&root, testkit::key(1).public()),
        vec![],
    );
    let seed = vec![addr(&a)];

    // Admitted: connects, and ops flow both ways.
    let b = server(
        testkit::key(2),
        root.public(),
        cert_for(&root, testkit::key(2).public()),
        seed.clone(),
    );
    eventually("a and b to connect", || {
        connected(&a) == 1 && connected(&b) == 1
    })
    .await;
    local_op(&a, "from-a");
    local_op(&b, "from-b");
    let (ka, kb) = (a.key.public(), b.key.public());
    eventually("ops to replicate", || {
        head_of(&b, &ka) == 1 && head_of(&a, &kb) == 1
    })
    .await;

    // Another cluster (other root): refused (cluster id mismatch).
    let other_root = testkit::key(101);
    let c = server(
        testkit::key(3),
        other_root.public(),
        cert_for(&other_root, testkit::key(3).public()),
        seed.clone(),
    );
    // A certificate for another key: refused.
    let d = server(
        testkit::key(4),
        root.public(),
        cert_for(&root, testkit::key(9).public()),
        seed.clone(),
    );
    // No certificate and unknown to the state: refused.
    let e = server(testkit::key(5), root.public(), Vec::new(), seed.clone());
    // A certificate signed by a key that is not the root: refused.
    let f = server(
        testkit::key(6),
        root.public(),
        cert_for(&other_root, testkit::key(6).public()),
        seed,
    );

    // Give them several dial rounds (seeds are re-dialled every 3 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    local_op(&a, "after");
    eventually("b to get a's second op", || head_of(&b, &ka) == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(connected(&a), 1, "a is connected to b only");
    for (name, s) in [("c", &c), ("d", &d), ("e", &e), ("f", &f)] {
        assert_eq!(connected(s), 0, "{name} must not be connected");
        assert_eq!(head_of(s, &ka), 0, "{name} must not have received a's ops");
    }
}
