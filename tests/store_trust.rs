//! Trust ops through the real store: admissions and a revocation folded, a late op of the
//! revoked server arriving out of order (refold), the trust table persisted in redb and read back
//! on reopen, identical to a full refold of the log.

use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::op::OpBody;
use lemonade_nexus::store::{Store, Submitted};
use lemonade_nexus::testkit::{create, key, now_ms, sealed};
use lemonade_nexus::tree::NodeId;
use lemonade_nexus::trust::{self, Revocation, ServerCert, TrustOp};

fn hlc(wall_ms: u64) -> Hlc {
    Hlc {
        wall_ms,
        logical: 0,
    }
}

fn admit(server: u8, name: &str) -> OpBody {
    OpBody::Trust(TrustOp::AdmitServer {
        cert: trust::seal_server_cert(
            key(1).pair(),
            &ServerCert {
                server: key(server).public(),
                name: name.into(),
                issued_at_ms: 1,
                expires_at_ms: 0,
            },
        ),
    })
}

fn revoke(server: u8) -> OpBody {
    OpBody::Trust(TrustOp::RevokeServer {
        revocation: trust::seal_revocation(
            key(1).pair(),
            &Revocation {
                server: key(server).public(),
                issued_at_ms: 2,
                reason: "test".into(),
            },
        ),
    })
}

fn effect(s: Submitted) -> bool {
    matches!(s, Submitted::Appended { effect: Ok(()), .. })
}

#[test]
fn revocation_survives_reopen_and_refold() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("state.redb");
    let (a, b) = (key(2), key(3));
    let now = now_ms();
    {
        let mut store = Store::create(&path, key(1).public(), IpamConfig::default())
            .expect("create")
            .0;
        let submit = |store: &mut Store, bytes: Vec<u8>| store.submit(&bytes, now).expect("submit");
        assert!(effect(submit(
            &mut store,
            sealed(&a, 1, hlc(1_000), admit(2, "a"))
        )));
        assert!(effect(submit(
            &mut store,
            sealed(&b, 1, hlc(1_001), admit(3, "b"))
        )));
        assert!(effect(submit(
            &mut store,
            sealed(&b, 2, hlc(1_002), create(NodeId::ROOT, "early", false))
        )));
        assert!(effect(submit(
            &mut store,
            sealed(&a, 2, hlc(1_010), revoke(3))
        )));
        // b's next op, created after the revocation (fold order), arrives: no effect.
        assert!(!effect(submit(
            &mut store,
            sealed(&b, 3, hlc(1_020), create(NodeId::ROOT, "late", false))
        )));
        // A third server's ops that sort BEFORE the revocation arrive late: the store refolds.
        let c = key(4);
        assert!(effect(submit(
            &mut store,
            sealed(&c, 1, hlc(1_003), admit(4, "c"))
        )));
        let s = submit(
            &mut store,
            sealed(&c, 2, hlc(1_005), create(NodeId::ROOT, "between", false)),
        );
        assert!(effect(s));
        assert!(
            store.refolds() > 0 || store.replays() > 0,
            "the late ops were refolded"
        );
        assert!(store.state().is_revoked(&b.public()));
        assert!(store.state().is_active_server(&a.public()));
        let hash = store.state_hash();
        assert_eq!(store.verify_against_log().expect("verify"), hash);
    }
    // Reopen: the trust table comes back from its redb table, equal to a refold.
    let store = Store::open(&path).expect("open").0;
    let st = store.state();
    assert!(st.is_revoked(&b.public()));
    assert_eq!(
        st.server_status(&b.public())
            .map(|s| s.revoke_reason.as_str()),
        Some("test")
    );
    assert_eq!(
        st.active_servers().map(|(k, _)| k).collect::<Vec<_>>(),
        vec![a.public(), key(4).public()]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    let names: Vec<&str> = st.tree().nodes().map(|n| n.hostname.as_str()).collect();
    assert!(names.contains(&"early") && names.contains(&"between") && !names.contains(&"late"));
    assert_eq!(
        store.verify_against_log().expect("verify"),
        store.state_hash()
    );
}
