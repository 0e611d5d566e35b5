//! Nothing lost: a child process writes a burst of ops (single ops, grouped batches, very late
//! ops from a second origin that force full refolds, slightly late ops from a third that replay
//! from the checkpoint) and prints each op's seq once `submit` returned; the
//! parent SIGKILLs it mid-burst, 20 times. After every kill the store reopens, every acknowledged
//! op is present, and the stored state equals a fresh fold of the log (same rows, same hash).
//!
//! The child is this same test binary, running the ignored test `child_writer` with an
//! environment variable naming the data directory.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::store::Store;
use lemonade_nexus::testkit::{claim_block, create, key, now_ms, sealed};
use lemonade_nexus::tree::NodeId;

const CHILD_ENV: &str = "LEMONADE_NEXUS_TEST_CRASH_DIR";

/// Kills the child on drop, so a failing assertion never leaves a writer running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn acknowledged_ops_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let exe = std::env::current_exe().expect("test binary path");
    let (a, b, c) = (key(1).public(), key(2).public(), key(3).public());
    let mut acked_a = 0u64;
    let mut acked_b = 0u64;
    let mut acked_c = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        // Kill after a pseudo-random number of acknowledgements (xorshift, fixed seed).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = 3 + (rng % 60) as usize;
        let child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let mut child = KillOnDrop(child);
        let out = child.0.stdout.take().expect("stdout");
        let mut seen = 0;
        for line in BufReader::new(out).lines() {
            let line = line.expect("read child stdout");
            let mut words = line.split_whitespace();
            if words.next() != Some("ACK") {
                continue;
            }
            let origin = words.next().expect("origin");
            let seq: u64 = words.next().and_then(|s| s.parse().ok()).expect("seq");
            match origin {
                "A" => acked_a = acked_a.max(seq),
                "B" => acked_b = acked_b.max(seq),
                _ => acked_c = acked_c.max(seq),
            }
            seen += 1;
            if seen >= kill_after {
                break;
            }
        }
        assert!(
            seen >= kill_after,
            "round {round}: child stopped after {seen} acks"
        );
        child.0.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
        child.0.wait().expect("reap");

        let (store, _report) = Store::open(&path).expect("reopen after SIGKILL");
        for (origin, acked) in [(a, acked_a), (b, acked_b), (c, acked_c)] {
            let head = store.heads().get(&origin).copied().unwrap_or(0);
            assert!(
                head >= acked,
                "round {round}: acknowledged seq {acked} lost (head {head})"
            );
            assert_eq!(
                store.ops_of(&origin, 1, acked).expect("ops").len() as u64,
                acked,
                "round {round}"
            );
        }
        let folded = store
            .verify_against_log()
            .expect("stored state equals the fold of the log");
        assert_eq!(folded, store.state_hash());
    }
    assert!(
        acked_a > 20 && acked_b > 0 && acked_c > 0,
        "the bursts did write (a {acked_a}, b {acked_b}, c {acked_c})"
    );
}

/// The child: writes until killed. Ignored in normal runs; the test above starts it.
#[test]
#[ignore = "child process of acknowledged_ops_survive_sigkill"]
fn child_writer() {
    let dir = std::env::var(CHILD_ENV).expect("run by acknowledged_ops_survive_sigkill");
    let path = std::path::Path::new(&dir).join("state.redb");
    let (anchor, other, third) = (key(1), key(2), key(3));
    let (mut store, _) =
        Store::create(&path, anchor.public(), IpamConfig::default()).expect("store");
    store.set_checkpoint_interval(16); // checkpoints move often during the burst
    let stdout = std::io::stdout();
    let pid = std::process::id();
    for i in 0u64.. {
        let now = now_ms();
        let results = if i % 7 == 3 {
            // A grouped batch of 8 local ops in one transaction.
            let ops = (0..8)
                .map(|j| {
                    (
                        anchor.public(),
                        create(NodeId::ROOT, &format!("b{pid}-{i}-{j}"), false),
                        None,
                    )
                })
                .collect();
            store.append_local_batch(&anchor, ops, now).expect("batch")
        } else if i % 5 == 1 {
            // A late op from another origin: its HLC is older than everything, so it forces a refold.
            let seq = store.heads().get(&other.public()).copied().unwrap_or(0) + 1;
            let op = sealed(
                &other,
                seq,
                Hlc {
                    wall_ms: seq,
                    logical: 0,
                },
                claim_block(seq as u32 % 8),
            );
            vec![store.submit(&op, now)]
        } else if i % 5 == 2 {
            // A slightly late op from a third origin: just behind the newest op, so the store
            // replays from its checkpoint instead of refolding everything.
            let seq = store.heads().get(&third.public()).copied().unwrap_or(0) + 1;
            let newest = store.clock();
            let hlc = Hlc {
                wall_ms: newest.wall_ms.saturating_sub(1),
                logical: 0,
            };
            let op = sealed(&third, seq, hlc, claim_block(8 + seq as u32 % 8));
            vec![store.submit(&op, now)]
        } else {
            let body = create(NodeId::ROOT, &format!("s{pid}-{i}"), i % 2 == 0);
            vec![store.append_local(&anchor, anchor.public(), body, None, now)]
        };
        let mut out = stdout.lock();
        for r in results {
            match r.expect("op accepted") {
                lemonade_nexus::store::Submitted::Appended { origin, seq, .. } => {
                    let who = if origin == anchor.public() {
                        "A"
                    } else if origin == other.public() {
                        "B"
                    } else {
                        "C"
                    };
                    writeln!(out, "ACK {who} {seq}").expect("stdout");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        out.flush().expect("flush");
    }
}
