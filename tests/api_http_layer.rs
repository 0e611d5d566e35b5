//! What the HTTP layer answers before any handler runs, through a real `serve`: the `*` request
//! target and a wrong Content-Type get the JSON error shape; requests the framework cannot parse
//! (it answers them itself, a bare 400) are logged at DEBUG at most once per interval, never one
//! ERROR line per request.

use std::process::Stdio;
use std::time::Duration;

use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::tls::JoinUrl;
use serde_json::Value;

mod serve_common;
use serve_common::{Proc, bin};

/// `serve --no-dataplane` on loopback with its stderr in `log`.
fn start(dir: &std::path::Path, log: &std::path::Path) -> (Proc, JoinUrl) {
    let mut c = bin();
    c.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--listen-api", "127.0.0.1:0", "--log-level", "debug"])
        .args(["--listen-gossip", "127.0.0.1:0", "serve", "--no-dataplane"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"));
    let mut child = c.spawn().expect("start serve");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    use std::io::BufRead;
    let url = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("join URL:").map(|u| u.trim().to_owned()))
        .expect("serve printed its join URL");
    (proc, JoinUrl::parse(&url).expect("join URL"))
}

fn error_code(r: &lemonade_nexus::api::client::Response) -> String {
    let v: Value = serde_json::from_slice(&r.body).expect("a JSON body");
    v["error"]["code"].as_str().expect("error.code").to_owned()
}

#[test]
fn pre_handler_errors_are_json_and_parse_errors_are_rate_limited_debug_lines() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("serve.log");
    let (_server, url) = start(dir.path(), &log);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let c = PinnedClient::new(url).expect("client");
    rt.block_on(async {
        // `OPTIONS *` matches no scope: the app-level default answers, in the JSON shape.
        let r = c.request("OPTIONS", "*", None).await.expect("OPTIONS *");
        assert_eq!((r.status, error_code(&r).as_str()), (404, "not_found"));
        // A wrong method on a known route.
        let r = c.request("PUT", "/api/health", None).await.expect("PUT");
        assert_eq!((r.status, error_code(&r).as_str()), (404, "not_found"));
        // A body that is not declared JSON.
        let r = c
            .request("POST", "/api/auth?x", None)
            .await
            .expect("POST without a body");
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (415, "unsupported_media_type")
        );
        // A header line without a colon: actix-http answers 400 itself, before any service.
        for _ in 0..40 {
            let r = c
                .request(
                    "GET",
                    "/api/health HTTP/1.1\r\nBroken header line\r\nX-Pad:",
                    None,
                )
                .await
                .expect("malformed request");
            assert_eq!(r.status, 400);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&log).expect("log");
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("refused by the HTTP layer"))
        .collect();
    assert!(
        !text.lines().any(|l| l.contains("ERROR")),
        "no ERROR line for a client's bad request:\n{text}"
    );
    assert_eq!(
        refused.len(),
        1,
        "one DEBUG line per 10 s for 40 malformed requests:\n{text}"
    );
    assert!(refused[0].contains("DEBUG"), "{}", refused[0]);
}
