//! `lemonade-nexus demo` end to end (needs root; CI is root).
//!
//! - `--for 20s`: it builds three servers and four clients in namespaces, prints once which name
//!   is which (namespaces, addresses, the log directory) and what the tables mean, waits until the
//!   cluster is settled, so its first table already shows converged state hashes, every backbone
//!   and client handshake and every same-group ping answering (across servers), and across groups
//!   blocked; it exits cleanly when the duration is over and leaves nothing behind: no namespace,
//!   interface, UAPI socket, process or directory, and prints no stray `kill` complaint. With
//!   `LN_E2E_DATAPLANE=kernel` it runs on kernel WireGuard (inside User-Mode Linux:
//!   tests/uml/run-kernel-tests.sh).
//! - `--dataplane kernel` on a kernel without WireGuard (this host, and CI's): it fails within
//!   seconds with the server's own reason, printed before `cleaned up`, names no file it removed,
//!   and leaves nothing behind. Where the kernel has WireGuard that case cannot arise, so the test
//!   runs the kernel demo itself instead (in UML the first test already does).

#[path = "../netlink/tests/common/mod.rs"]
mod common;

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

const SERVERS: [&str; 3] = ["s1", "s2", "s3"];
const CLIENTS: [&str; 4] = ["red-a", "red-b", "blue-c", "blue-d"];

/// One finished run of `demo`.
struct DemoRun {
    stdout: String,
    stderr: String,
    status: ExitStatus,
    took: Duration,
    /// `lemonade-nexus-demo-<pid>`: the name of its directory under the temp dir.
    dir_tag: String,
}

fn run_demo(dataplane: &str, run_for: &str) -> DemoRun {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["--config", "/dev/null", "--dataplane", dataplane])
        .args(["demo", "--for", run_for, "--interval", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run demo");
    let dir_tag = format!("lemonade-nexus-demo-{}", child.id());
    let out = child.wait_with_output().expect("demo output");
    let run = DemoRun {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
        took: started.elapsed(),
        dir_tag,
    };
    eprintln!("{}", run.stdout);
    eprintln!("stderr:\n{}", run.stderr);
    run
}

/// The `lnd<pid>` prefix every name of the demo starts with.
fn prefix(run: &DemoRun) -> String {
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("demo: building the cluster under "))
        .and_then(|r| r.split_whitespace().next())
        .expect("the demo names its prefix")
        .to_owned()
}

fn kernel_has_wireguard() -> bool {
    let probe = common::Netns::new("dk");
    let out = common::run(
        probe
            .cmd("ip")
            .args(["link", "add", "lnprobe0", "type", "wireguard"]),
    );
    out.status.success()
}

#[test]
fn demo_runs_converges_pings_across_servers_and_cleans_up() {
    // `LN_E2E_DATAPLANE=kernel` (inside User-Mode Linux) runs it on kernel WireGuard.
    let dataplane = match std::env::var("LN_E2E_DATAPLANE").as_deref() {
        Ok("kernel") => "kernel",
        Ok("userspace") | Err(_) => "userspace",
        Ok(other) => panic!("LN_E2E_DATAPLANE must be kernel or userspace, not {other:?}"),
    };
    let run = run_demo(dataplane, "20s");
    assert!(run.status.success(), "demo failed: {}", run.status);
    assert_settled_run(&run);
    assert_nothing_left_behind(&run);
}

#[test]
fn demo_on_kernel_dataplane_without_kernel_wireguard_fails_at_once_with_the_reason() {
    if kernel_has_wireguard() {
        if std::env::var("LN_E2E_DATAPLANE").as_deref() == Ok("kernel") {
            eprintln!(
                "this kernel has WireGuard, so it cannot lack it: `demo --dataplane kernel` runs \
                 in full in demo_runs_converges_pings_across_servers_and_cleans_up of this run"
            );
            return;
        }
        eprintln!(
            "this kernel has WireGuard, so it cannot lack it: running the kernel demo instead"
        );
        let run = run_demo("kernel", "2s");
        assert!(run.status.success(), "kernel demo failed: {}", run.status);
        assert_settled_run(&run);
        assert_nothing_left_behind(&run);
        return;
    }
    let run = run_demo("kernel", "20s");
    assert!(
        !run.status.success(),
        "the demo must fail without kernel WireGuard"
    );
    // The server exits at once; the demo notices that instead of waiting for its join URL.
    assert!(
        run.took < Duration::from_secs(15),
        "the demo took {:?} to fail",
        run.took
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    let failed = lines
        .iter()
        .position(|l| l.starts_with("demo: failed: server s"))
        .expect("the demo says which server failed");
    let reason = lines[failed];
    assert!(
        reason.contains("exited during start-up")
            && reason.contains("kernel WireGuard is not available"),
        "the server's own reason: {reason}"
    );
    let cleaned = lines
        .iter()
        .position(|l| l.starts_with("demo: cleaned up"))
        .expect("the demo cleans up");
    assert!(failed < cleaned, "the reason comes before `cleaned up`");
    assert!(
        run.stderr.contains("error: the demo failed"),
        "it exits with an error: {}",
        run.stderr
    );
    // Nothing the output names is gone: it names no file of the (removed) demo directory.
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        !all.contains(&run.dir_tag) && !all.contains(".log"),
        "the output names a removed file:\n{all}"
    );
    assert_nothing_left_behind(&run);
}

/// The map and legend printed once, the first table settled, the last still healthy.
fn assert_settled_run(run: &DemoRun) {
    let text = &run.stdout;
    let prefix = prefix(run);
    let once = |needle: &str| text.matches(needle).count() == 1;
    assert!(once("demo: who is where"), "the map, once");
    assert!(once("demo: a table every 2 s:"), "the legend, once");
    for part in ["  servers: ", "  clients: ", "  pings: "] {
        assert!(once(part), "the legend explains {part:?}");
    }
    for name in SERVERS.iter().chain(CLIENTS.iter()) {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("  {name} ")))
            .unwrap_or_else(|| panic!("the map names {name}"));
        assert!(
            row.contains(&format!("namespace {prefix}"))
                && row.contains("underlay 192.168.250.")
                && row.contains("tunnel 10.")
                && row.contains("log "),
            "the map row of {name}: {row}"
        );
    }
    let logs = std::env::temp_dir().join(&run.dir_tag);
    assert!(
        text.contains(&format!("demo: logs in {}/", logs.display())),
        "the map names the log directory"
    );
    assert!(
        !format!("{text}{}", run.stderr).contains("No such process"),
        "no stray kill complaint"
    );

    let ready = text
        .find("demo: ready after")
        .expect("the demo waits until ready");
    let mut tables = text.split("\n=== lemonade-nexus demo").skip(1);
    let first = tables.next().expect("a first table");
    assert!(
        text.find("\n=== lemonade-nexus demo")
            .is_some_and(|t| t > ready),
        "the first table comes once the cluster is ready"
    );
    assert_table_settled(first, "first");
    let last = tables.last().unwrap_or(first);
    assert_table_settled(last, "last");
    assert!(!text.contains("isolation broken"), "{text}");
    assert!(text.contains("demo: cleaned up"));
}

/// Every expected answer is there: converged hashes, every backbone peer and client handshake,
/// same-group pings (across servers) answering and other groups blocked.
fn assert_table_settled(table: &str, which: &str) {
    for bad in [
        "NO ANSWER",
        "NOT CONVERGED",
        "(down)",
        "never",
        "isolation broken",
    ] {
        assert!(
            !table.contains(bad),
            "the {which} table shows {bad:?}:\n{table}"
        );
    }
    assert!(
        table.contains("state hashes: converged"),
        "{which} table:\n{table}"
    );
    for s in SERVERS {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{s} ")) && l.trim_end().ends_with(" 2/2")),
            "{s} has both backbone peers alive in the {which} table:\n{table}"
        );
    }
    for pair in ["red-a (s1) -> red-b (s2)", "blue-c (s3) -> blue-d (s1)"] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(pair) && l.contains("cross-server") && l.contains(": ok")),
            "{pair} answers in the {which} table:\n{table}"
        );
    }
    assert_eq!(
        table
            .lines()
            .filter(|l| l.contains("other group") && l.contains("blocked"))
            .count(),
        4,
        "the four pairs of different groups are blocked in the {which} table:\n{table}"
    );
}

fn assert_nothing_left_behind(run: &DemoRun) {
    let prefix = prefix(run);
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
        if cmdline.contains(&run.dir_tag) || cmdline.contains(&prefix) {
            leftovers.push(format!("{name}: {cmdline}"));
        }
    }
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
    assert!(
        !std::env::temp_dir().join(&run.dir_tag).exists(),
        "directory left behind: {}",
        run.dir_tag
    );
}
