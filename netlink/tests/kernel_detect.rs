//! Backend detection on whatever kernel runs the test: the answer must match what the kernel
//! can do, and a fallback must be reported. Runs on the host (no WireGuard) and inside UML.

use lemonade_nexus_netlink::{
    BackendKind, BackendPreference,
    kernel::detect::{choose_backend, decide, kernel_wireguard_available},
    netns::run_in_new_netns,
};

#[test]
fn detection_picks_the_kernel_or_reports_the_fallback() {
    run_in_new_netns(|| async {
        let available = kernel_wireguard_available().await;
        let auto = choose_backend(BackendPreference::Auto)
            .await
            .expect("auto never fails");
        let forced = choose_backend(BackendPreference::Kernel).await;
        let user = choose_backend(BackendPreference::Userspace)
            .await
            .expect("userspace");
        assert_eq!(user.kind, BackendKind::Userspace);
        assert!(
            !user.fell_back(),
            "a forced userspace backend is a choice, not a fallback"
        );
        match available {
            Ok(()) => {
                assert_eq!(auto.kind, BackendKind::Kernel);
                assert!(forced.is_ok());
            }
            Err(why) => {
                // On this kind of host: the family is missing and the link type unsupported.
                assert!(why.contains("EOPNOTSUPP"), "{why}");
                assert_eq!(auto.kind, BackendKind::Userspace);
                assert_eq!(auto.fallback_reason.as_deref(), Some(why.as_str()));
                let err = forced.expect_err("forcing an unavailable kernel backend fails");
                assert!(err.to_string().contains("forced"), "{err}");
            }
        }
    })
    .expect("private network namespace (needs root)");
}

#[test]
fn fallback_decision_is_reported() {
    let c = decide(Err("no module".into()));
    assert_eq!(c.kind, BackendKind::Userspace);
    assert_eq!(c.fallback_reason.as_deref(), Some("no module"));
    let k = decide(Ok(()));
    assert_eq!(k.kind, BackendKind::Kernel);
    assert!(!k.fell_back());
    assert_eq!("kernel".parse(), Ok(BackendPreference::Kernel));
    assert!("kernal".parse::<BackendPreference>().is_err());
}
