//! The private API end to end in network namespaces (needs root; CI is root), userspace backend:
//! `serve` in namespace `srv`, `lemonade-nexus join` in namespace `cli` (a veth pair between them).
//! Through the tunnel the client reaches the private API (pinned TLS, its join token: 200; no
//! token: 401), on the server's IPv4 and IPv6 tunnel addresses alike; on the server's public
//! (underlay) addresses, IPv4 and IPv6, port 9101 is closed: the private API is unreachable from
//! the public plane.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Netns, must, unique_name};
use e2e_common::{Proc, start_serve, veth_pair};
use lemonade_nexus::api::join::JoinResponse;
use lemonade_nexus::tls::{JoinUrl, Pin};

const SRV_UNDERLAY: &str = "192.168.232.1";
const CLI_UNDERLAY: &str = "192.168.232.2";
const SRV_UNDERLAY6: &str = "fd00:232::1";
const CLI_UNDERLAY6: &str = "fd00:232::2";

/// Adds `addr` (IPv6, /64, no duplicate address detection) to the veth end in `ns`.
fn add_underlay6(ns: &Netns, addr: &str) {
    let links = must(ns.cmd("ip").args(["-o", "link", "show", "type", "veth"]));
    let dev = links
        .split(':')
        .nth(1)
        .map(|d| d.trim().split('@').next().unwrap_or("").to_owned())
        .expect("a veth in the namespace");
    ns.ip(&[
        "-6",
        "address",
        "add",
        &format!("{addr}/64"),
        "dev",
        &dev,
        "nodad",
    ]);
}

/// Starts `serve` inside `ns` and waits for its start-up summary; returns the join URL.
fn start_server(ns: &Netns, dir: &std::path::Path, ifname: &str) -> (Proc, JoinUrl) {
    start_serve(ns, dir, ifname, SRV_UNDERLAY, &[])
}

/// `GET /api/tree` over pinned TLS to `host:port`; the HTTP status, or the connection error.
async fn get_tree(host: &str, port: u16, pin: Pin, token: Option<&str>) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = lemonade_nexus::tls::pinned_client_config(pin).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let authority = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let req =
        format!("GET /api/tree HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n{auth}\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {text}"))
}

#[test]
fn the_private_api_answers_through_the_tunnel_and_not_on_the_public_plane() {
    let srv = Netns::new("ps");
    let cli = Netns::new("pc");
    veth_pair(&srv, &cli, SRV_UNDERLAY, CLI_UNDERLAY);
    add_underlay6(&srv, SRV_UNDERLAY6);
    add_underlay6(&cli, CLI_UNDERLAY6);
    let (sif, cif) = (unique_name("ls"), unique_name("lc"));
    srv.own_uapi_socket(&sif);
    cli.own_uapi_socket(&cif);
    let dir = tempfile::tempdir().expect("tmp");
    let (_server, url) = start_server(&srv, dir.path(), &sif);

    let out = must(
        cli.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"))
            .args(["--config", "/dev/null", "--data-dir"])
            .arg(dir.path().join("client"))
            .arg("--master-key-file")
            .arg(dir.path().join("client-master.key"))
            .args([
                "--dataplane",
                "userspace",
                "join",
                "--once",
                &url.to_string(),
            ])
            .args(["--wg-interface", &cif]),
    );
    eprintln!("join: {out}");
    let saved = std::fs::read(dir.path().join("client").join("join.json")).expect("join.json");
    let joined: JoinResponse = serde_json::from_slice(&saved).expect("join answer");
    let private = joined
        .private_api
        .strip_prefix("https://")
        .expect("https URL")
        .to_owned();
    let (host, port) = private.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    assert_eq!(
        host, joined.server_tunnel_ipv4,
        "the private API is on the tunnel address"
    );

    let token = joined.token.clone();
    let host6 = joined.server_tunnel_ipv6.clone();
    let (through, public, no_token, through6, no_token6, public6) = cli.block_on(|| async {
        // The tunnel may need a handshake first: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        let through = loop {
            let r = get_tree(host, port, url.pin, Some(&token)).await;
            if r.is_ok() || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let no_token = get_tree(host, port, url.pin, None).await;
        let public = get_tree(SRV_UNDERLAY, port, url.pin, Some(&token)).await;
        // The IPv6 tunnel address serves the same API; the IPv6 underlay does not.
        let through6 = get_tree(&host6, port, url.pin, Some(&token)).await;
        let no_token6 = get_tree(&host6, port, url.pin, None).await;
        let public6 = get_tree(SRV_UNDERLAY6, port, url.pin, Some(&token)).await;
        (through, public, no_token, through6, no_token6, public6)
    });
    assert_eq!(through, Ok(200), "through the tunnel, with the join token");
    assert_eq!(no_token, Ok(401), "through the tunnel, without a token");
    assert!(
        public.is_err(),
        "the private port must be closed on the public address, got {public:?}"
    );
    assert_eq!(
        through6,
        Ok(200),
        "through the tunnel to [{host6}]:{port}, with the join token"
    );
    assert_eq!(
        no_token6,
        Ok(401),
        "through the IPv6 tunnel, without a token"
    );
    assert!(
        public6.is_err(),
        "the private port must be closed on the public IPv6 address, got {public6:?}"
    );
    // And the IPv6 underlay itself works (so the refusal above is the listener's).
    assert!(
        e2e_common::ping(&cli, SRV_UNDERLAY6, Duration::from_secs(5)),
        "the server's IPv6 underlay address answers ping"
    );
}
