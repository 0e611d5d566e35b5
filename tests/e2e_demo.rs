//! `lemonade-nexus demo --for 20s` end to end (needs root; CI is root): it builds three servers
//! and four clients in namespaces, its status tables show converged state hashes and
//! same-group pings across servers answering (and across groups blocked), it exits cleanly
//! when the duration is over, and it leaves nothing behind: no namespace, no interface, no UAPI
//! socket, no process, no directory. With `LN_E2E_DATAPLANE=kernel` it runs on kernel WireGuard
//! (inside User-Mode Linux: tests/uml/run-kernel-tests.sh).

use std::process::Command;

#[test]
fn demo_runs_converges_pings_across_servers_and_cleans_up() {
    // `LN_E2E_DATAPLANE=kernel` (inside User-Mode Linux) runs it on kernel WireGuard.
    let dataplane = match std::env::var("LN_E2E_DATAPLANE").as_deref() {
        Ok("kernel") => "kernel",
        Ok("userspace") | Err(_) => "userspace",
        Ok(other) => panic!("LN_E2E_DATAPLANE must be kernel or userspace, not {other:?}"),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["--config", "/dev/null", "--dataplane", dataplane])
        .args(["demo", "--for", "20s", "--interval", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run demo");
    let dir_tag = format!("lemonade-nexus-demo-{}", child.id());
    let out = child.wait_with_output().expect("demo output");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    eprintln!("stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed: {}", out.status);

    let prefix = text
        .lines()
        .find_map(|l| l.strip_prefix("demo: building the cluster under "))
        .and_then(|r| r.split_whitespace().next())
        .expect("the demo names its prefix")
        .to_owned();
    assert!(
        text.contains("state hashes: converged"),
        "the servers' state hashes converged"
    );
    // Same group, clients on different servers, answering (the last table must show both).
    let last = text
        .rsplit("=== lemonade-nexus demo")
        .next()
        .expect("a table");
    for pair in ["red-a (s1) -> red-b (s2)", "blue-c (s3) -> blue-d (s1)"] {
        assert!(
            last.lines()
                .any(|l| l.contains(pair) && l.contains("cross-server") && l.contains(": ok")),
            "{pair} answers in the last table:\n{last}"
        );
    }
    assert!(
        last.lines()
            .any(|l| l.contains("other group") && l.contains("blocked")),
        "other groups are blocked:\n{last}"
    );
    assert!(
        !text.contains("isolation broken") && last.contains("state hashes: converged"),
        "{last}"
    );
    assert!(text.contains("demo: cleaned up"));

    // Nothing left behind.
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns")
            .stdout,
    )
    .into_owned();
    assert!(!netns.contains(&prefix), "namespaces left behind: {netns}");
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip link")
            .stdout,
    )
    .into_owned();
    assert!(!links.contains(&prefix), "interfaces left behind: {links}");
    let sockets: Vec<String> = std::fs::read_dir("/var/run/wireguard")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(sockets.is_empty(), "UAPI sockets left behind: {sockets:?}");
    // Every child ran with the demo's directory on its command line, or in a namespace of it.
    let mut leftovers = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(&dir_tag) || cmdline.contains(&prefix) {
            leftovers.push(format!("{name}: {cmdline}"));
        }
    }
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
    let tmp_left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| *n == dir_tag)
        .collect();
    assert!(tmp_left.is_empty(), "directories left behind: {tmp_left:?}");
}
