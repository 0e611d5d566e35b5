//! The client side of the public API: a small HTTPS/1.1 client that trusts exactly the pinned
//! certificate of the join URL ([`crate::tls::PinVerifier`]), and the join conversation
//! (challenge, proof, join). Used by the join agent and by the tests.
//!
//! [`PinnedClient::request`] sends one request per connection (`Connection: close`);
//! [`PinnedClient::connect`] opens a kept-alive [`Connection`] for several requests over one TLS
//! handshake. Bodies are bounded to [`MAX_RESPONSE_BYTES`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::auth::{AuthRequest, AuthResponse, ChallengeResponse, make_proof};
use super::join::JoinResponse;
use crate::identity::NodeKey;
use crate::tls::{JoinUrl, pinned_client_config};

/// Largest response read.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Bound on one whole request (connect, TLS, write, read).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON, or an error naming the status and the server's error message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        if !(200..300).contains(&self.status) {
            bail!(
                "server answered {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            );
        }
        serde_json::from_slice(&self.body).context("server answer is not the expected JSON")
    }
}

/// A client of one server, pinned to its certificate.
#[derive(Clone)]
pub struct PinnedClient {
    url: JoinUrl,
    connector: TlsConnector,
    /// Sent as `Authorization: Bearer <token>` when set (the private API).
    bearer: Option<String>,
}

impl PinnedClient {
    pub fn new(url: JoinUrl) -> Result<Self> {
        let cfg = pinned_client_config(url.pin)?;
        Ok(PinnedClient {
            url,
            connector: TlsConnector::from(Arc::new(cfg)),
            bearer: None,
        })
    }

    /// The same client sending `token` as its bearer token.
    pub fn with_bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// Sends one request; `body` is sent as JSON when present.
    pub async fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .with_context(|| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// A TCP connection and TLS handshake (the pin checked).
    async fn handshake(&self) -> Result<TlsStream<TcpStream>> {
        let (host, port) = (&self.url.host, self.url.port);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        // Requests are small and answered at once: do not hold them back (Nagle).
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(host.clone()).context("server host is not a valid name")?;
        self.connector.connect(name, tcp).await.with_context(|| {
            format!("TLS handshake with {host}:{port} failed (certificate pin checked)")
        })
    }

    /// The request head and body bytes.
    fn request_bytes(&self, method: &str, path: &str, body: Option<&[u8]>, close: bool) -> Vec<u8> {
        let (host, port) = (&self.url.host, self.url.port);
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let connection = if close { "close" } else { "keep-alive" };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: {connection}\r\nAccept: application/json\r\n"
        );
        if let Some(t) = &self.bearer {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        bytes
    }

    /// Opens a kept-alive connection (one TLS handshake for many requests).
    pub async fn connect(&self) -> Result<Connection> {
        let tls = tokio::time::timeout(REQUEST_TIMEOUT, self.handshake())
            .await
            .with_context(|| format!("no TLS handshake within {REQUEST_TIMEOUT:?}"))??;
        Ok(Connection {
            client: self.clone(),
            tls,
            buf: Vec::new(),
        })
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response> {
        let mut tls = self.handshake().await?;
        tls.write_all(&self.request_bytes(method, path, body, true))
            .await?;
        tls.flush().await?;
        let mut raw = Vec::new();
        let mut limited = (&mut tls).take(MAX_RESPONSE_BYTES as u64 + 1);
        // A server that closes without close_notify still gave us the bytes it sent.
        if let Err(e) = limited.read_to_end(&mut raw).await
            && e.kind() != std::io::ErrorKind::UnexpectedEof
        {
            return Err(e).context("reading the answer");
        }
        if raw.len() > MAX_RESPONSE_BYTES {
            bail!("answer larger than {MAX_RESPONSE_BYTES} bytes");
        }
        parse_response(&raw)
    }

    pub async fn get(&self, path: &str) -> Result<Response> {
        self.request("GET", path, None).await
    }

    pub async fn post<T: Serialize>(&self, path: &str, body: &T) -> Result<Response> {
        let b = serde_json::to_vec(body)?;
        self.request("POST", path, Some(&b)).await
    }

    /// Asks for a challenge and answers it: a fresh proof for `key`.
    pub async fn proof(&self, key: &NodeKey) -> Result<String> {
        let c: ChallengeResponse = self
            .post(
                "/api/auth/challenge",
                &serde_json::json!({ "pubkey": key.public().to_string() }),
            )
            .await?
            .json()?;
        answer_challenge(key, &c)
    }

    /// Authenticates and returns a token.
    pub async fn auth(&self, key: &NodeKey) -> Result<AuthResponse> {
        let proof = self.proof(key).await?;
        self.post("/api/auth", &AuthRequest { proof }).await?.json()
    }

    /// Authenticates and joins with WireGuard public key `wg_pubkey` (base64).
    pub async fn join(
        &self,
        key: &NodeKey,
        wg_pubkey: &str,
        hostname: Option<&str>,
    ) -> Result<JoinResponse> {
        self.join_with_key(key, wg_pubkey, hostname, None).await
    }

    /// [`PinnedClient::join`], redeeming a setup key (the device lands in the key's group).
    pub async fn join_with_key(
        &self,
        key: &NodeKey,
        wg_pubkey: &str,
        hostname: Option<&str>,
        setup_key: Option<&str>,
    ) -> Result<JoinResponse> {
        // Challenge and join over one connection: one TLS handshake per join for the server.
        let mut conn = self.connect().await?;
        let proof = conn.proof(key).await?;
        let mut body =
            serde_json::json!({ "proof": proof, "wg_pubkey": wg_pubkey, "hostname": hostname });
        if let Some(k) = setup_key {
            body["setup_key"] = serde_json::Value::String(k.to_owned());
        }
        conn.post("/api/join", &body).await?.json()
    }
}

/// One kept-alive HTTPS connection to the server ([`PinnedClient::connect`]): requests are sent
/// one after the other, each answer read by its `Content-Length` (or chunked encoding). A device
/// joins over one (challenge, then join); a load generator keeps one per simulated client.
pub struct Connection {
    client: PinnedClient,
    tls: TlsStream<TcpStream>,
    /// Bytes read past the previous answer.
    buf: Vec<u8>,
}

impl Connection {
    /// Sends one request and reads its answer; `body` is sent as JSON when present. After an
    /// error the connection is unusable (drop it and connect again).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response> {
        let req = self.client.request_bytes(method, path, body, false);
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            self.tls.write_all(&req).await?;
            self.tls.flush().await?;
            loop {
                if let Some((r, used)) = parse_framed(&self.buf)? {
                    self.buf.drain(..used);
                    return Ok(r);
                }
                if self.buf.len() > MAX_RESPONSE_BYTES {
                    bail!("answer larger than {MAX_RESPONSE_BYTES} bytes");
                }
                let mut chunk = [0u8; 16 * 1024];
                let n = self
                    .tls
                    .read(&mut chunk)
                    .await
                    .context("reading the answer")?;
                if n == 0 {
                    bail!("the server closed the connection before a complete answer");
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .with_context(|| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    pub async fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, None).await
    }

    pub async fn post<T: Serialize>(&mut self, path: &str, body: &T) -> Result<Response> {
        let b = serde_json::to_vec(body)?;
        self.request("POST", path, Some(&b)).await
    }

    /// [`PinnedClient::proof`] over this connection.
    pub async fn proof(&mut self, key: &NodeKey) -> Result<String> {
        let c: ChallengeResponse = self
            .post(
                "/api/auth/challenge",
                &serde_json::json!({ "pubkey": key.public().to_string() }),
            )
            .await?
            .json()?;
        answer_challenge(key, &c)
    }
}

/// The proof of possession answering challenge `c` with `key`.
fn answer_challenge(key: &NodeKey, c: &ChallengeResponse) -> Result<String> {
    let server = c
        .server_key
        .parse()
        .context("server_key in the challenge answer")?;
    let challenge = c.challenge()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok(make_proof(key.pair(), &challenge, server, now))
}

/// One complete answer at the start of `raw`, framed by `Content-Length` or chunked encoding,
/// and how many bytes it used; `None` while incomplete. An answer framed by the end of the
/// connection cannot be read on a kept-alive connection: an error.
fn parse_framed(raw: &[u8]) -> Result<Option<(Response, usize)>> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..split]).context("answer header is not UTF-8")?;
    let (status, framing) = parse_head(head)?;
    let body = &raw[split + 4..];
    match framing {
        Framing::Length(n) => Ok(body.get(..n).map(|b| {
            (
                Response {
                    status,
                    body: b.to_vec(),
                },
                split + 4 + n,
            )
        })),
        Framing::Chunked => match chunked_end(body)? {
            Some(end) => Ok(Some((
                Response {
                    status,
                    body: dechunk(&body[..end])?,
                },
                split + 4 + end,
            ))),
            None => Ok(None),
        },
        Framing::UntilClose => bail!("answer without Content-Length on a kept-alive connection"),
    }
}

/// Where a chunked body ends (after its last chunk and trailer), or `None` while incomplete.
fn chunked_end(b: &[u8]) -> Result<Option<usize>> {
    let mut at = 0;
    loop {
        let Some(eol) = b[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_txt = std::str::from_utf8(&b[at..at + eol]).context("bad chunk size")?;
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if size > MAX_RESPONSE_BYTES {
            bail!("chunk larger than {MAX_RESPONSE_BYTES} bytes");
        }
        at += eol + 2;
        if size == 0 {
            // No trailers are sent to us; the body ends with an empty line.
            return Ok((b.len() >= at + 2).then_some(at + 2));
        }
        if b.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

/// How an answer's body is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// The status and body framing of an answer's head.
fn parse_head(head: &str) -> Result<(u16, Framing)> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            let n = v.parse::<usize>().context("bad Content-Length")?;
            if n > MAX_RESPONSE_BYTES {
                bail!("answer larger than {MAX_RESPONSE_BYTES} bytes");
            }
            framing = Framing::Length(n);
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        }
    }
    Ok((status, framing))
}

/// Parses an HTTP/1.1 answer with a `Content-Length` body or a body up to the end of the
/// connection. Chunked bodies are decoded.
fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("answer has no complete header")?;
    let head = std::str::from_utf8(&raw[..split]).context("answer header is not UTF-8")?;
    let body = &raw[split + 4..];
    let (status, framing) = parse_head(head)?;
    let body = match framing {
        Framing::Chunked => dechunk(body)?,
        Framing::Length(n) => body
            .get(..n)
            .context("answer body shorter than its Content-Length")?
            .to_vec(),
        Framing::UntilClose => body.to_vec(),
    };
    Ok(Response { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size_txt = std::str::from_utf8(&b[..eol]).context("bad chunk size")?;
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).context("truncated chunk")?);
        b = b.get(size + 2..).context("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lemonade_nexus_netlink::Key;

    fn answer() -> JoinResponse {
        JoinResponse {
            token: "t".into(),
            token_expires_at_ms: 0,
            node_id: "n".into(),
            group_id: "g".into(),
            existing: false,
            tunnel_ipv4: "10.64.3.17".into(),
            tunnel_ipv6: "fd6c:6e00::311".into(),
            addresses: vec![],
            server_wg_pubkey: Key([5; 32]).to_string(),
            server_wg_endpoint: "192.0.2.1:51940".into(),
            server_tunnel_ipv4: "10.64.0.1".into(),
            server_tunnel_ipv6: "fd6c:6e00::1".into(),
            allowed_ips: vec!["10.64.0.0/10".into(), "fd6c:6e00::/48".into()],
            dns_servers: vec![],
            private_api: String::new(),
            tls_pin: None,
            peer_programmed: true,
        }
    }

    #[test]
    fn the_join_answer_becomes_one_server_peer_and_plane_wide_addresses() {
        let (dev, link) = client_device(&answer(), PrivateKey(Key([1; 32]))).expect("config");
        assert_eq!(dev.peers.len(), 1);
        let p = &dev.peers[0];
        assert_eq!(p.public_key, Key([5; 32]));
        assert_eq!(p.endpoint, Some("192.0.2.1:51940".parse().expect("addr")));
        let ips: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            ips,
            vec!["10.64.0.1/32", "fd6c:6e00::1/128"],
            "the server itself only"
        );
        let addrs: Vec<String> = link.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, vec!["10.64.3.17/10", "fd6c:6e00::311/48"]);

        let mut outside = answer();
        outside.tunnel_ipv4 = "192.168.1.1".into();
        assert!(client_device(&outside, PrivateKey(Key([1; 32]))).is_err());
        let mut bad = answer();
        bad.server_wg_endpoint = "not an endpoint".into();
        assert!(client_device(&bad, PrivateKey(Key([1; 32]))).is_err());
    }

    #[test]
    fn mesh_peers_with_an_endpoint_become_direct_peers_and_bad_ones_are_refused() {
        use crate::api::private::mesh::{Peer, PeersResponse};
        let peer = |endpoint: Option<&str>| Peer {
            node_id: "n".into(),
            hostname: "h".into(),
            wg_pubkey: Key([7; 32]).to_string(),
            endpoint: endpoint.map(str::to_owned),
            endpoint_source: endpoint.map(|_| "observed".to_owned()),
            allowed_ips: vec!["10.64.3.18/32".into(), "fd6c:6e00::312/128".into()],
        };
        let answer = PeersResponse {
            group_id: "g".into(),
            peers: vec![peer(Some("192.0.2.9:4000")), peer(None)],
        };
        let peers = mesh_peers(&answer).expect("peers");
        assert_eq!(peers.len(), 1, "the peer without an endpoint waits");
        assert_eq!(peers[0].public_key, Key([7; 32]));
        assert_eq!(
            peers[0].endpoint,
            Some("192.0.2.9:4000".parse().expect("addr"))
        );
        let ips: Vec<String> = peers[0].allowed_ips.iter().map(|a| a.to_string()).collect();
        assert_eq!(ips, vec!["10.64.3.18/32", "fd6c:6e00::312/128"]);
        let bad = PeersResponse {
            group_id: "g".into(),
            peers: vec![peer(Some("not an endpoint"))],
        };
        assert!(mesh_peers(&bad).is_err());
    }

    #[test]
    fn kept_alive_answers_are_framed_one_by_one() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 409 C\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (r, used) = parse_framed(two).expect("ok").expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let (r, rest) = parse_framed(&two[used..]).expect("ok").expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (409, &b"abc"[..]));
        assert_eq!(used + rest, two.len());
        // Every strict prefix is incomplete, never an error nor a wrong answer.
        for n in 0..used {
            assert!(parse_framed(&two[..n]).expect("prefix").is_none(), "{n}");
        }
        for n in used..two.len() {
            assert!(
                parse_framed(&two[used..n]).expect("prefix").is_none(),
                "{n}"
            );
        }
        // No framing on a kept-alive connection, or a huge length: refused.
        assert!(parse_framed(b"HTTP/1.1 200 OK\r\n\r\nbody").is_err());
        assert!(parse_framed(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n").is_err());
    }

    #[test]
    fn parses_length_and_chunked_answers_and_refuses_garbage() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}extra").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!((r.status, r.body.as_slice()), (400, &b"abc"[..]));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 xx\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffff\r\nab")
                .is_err()
        );
    }
}

// ---- the join agent: join, program the interface, then keep refreshing until stopped ----

use lemonade_nexus_netlink::model::{IpNet, PrivateKey};
use lemonade_nexus_netlink::rtnl::LinkConfig;
use lemonade_nexus_netlink::{DeviceConfig, PeerConfig};

use crate::config::Config;

/// `lemonade-nexus join` options.
#[derive(clap::Args, Debug, Clone)]
pub struct JoinArgs {
    /// The join URL the server printed: https://HOST:PORT/#pin=sha256:...
    pub url: String,
    /// This device's name in the tree (a DNS label). Default: device-<key hash>.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Name of the local WireGuard interface.
    #[arg(long, value_name = "IFNAME", default_value = "ln-wg")]
    pub wg_interface: String,
    /// Join only (print the answer); do not program a WireGuard interface.
    #[arg(long)]
    pub no_dataplane: bool,
    /// Join once and exit instead of staying in the foreground as the agent.
    #[arg(long)]
    pub once: bool,
    /// Seconds between the agent's rounds (re-join with the same identity, reconcile the
    /// local interface).
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub interval: u64,
    /// A setup key: join the group it names (see `POST /api/setup-keys`).
    #[arg(long, value_name = "KEY")]
    pub setup_key: Option<String>,
}

/// `lemonade-nexus leave` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaveArgs {
    /// The WireGuard interface to remove. Default: the one `join` recorded.
    #[arg(long, value_name = "IFNAME")]
    pub wg_interface: Option<String>,
}

/// The local WireGuard device and link a join answer asks for. Pure.
///
/// The interface addresses carry the plane's prefix lengths (`10.64.x.y/10`), so the kernel's
/// connected routes send the whole client plane through the interface, with no routing table or
/// policy rule to manage.
///
/// The server peer's allowed IPs are the server's own tunnel addresses only (`/32`, `/128`), not
/// the plane: WireGuard then accepts from the server only packets the server itself sends, so even
/// a server host that forwards IP between its clients cannot let a device of another group reach
/// this one. Same-group devices are peers of their own ([`mesh_peers`]).
pub fn client_device(
    answer: &JoinResponse,
    private_key: PrivateKey,
) -> Result<(DeviceConfig, LinkConfig)> {
    let allowed: Vec<IpNet> = answer
        .allowed_ips
        .iter()
        .map(|p| {
            p.parse::<IpNet>()
                .with_context(|| format!("allowed IP {p:?}"))
        })
        .collect::<Result<_>>()?;
    let v4: std::net::Ipv4Addr = answer.tunnel_ipv4.parse().context("tunnel_ipv4")?;
    let v6: std::net::Ipv6Addr = answer.tunnel_ipv6.parse().context("tunnel_ipv6")?;
    let mut addresses = Vec::new();
    for net in &allowed {
        let a = match net {
            IpNet::V4(n) => IpNet::V4(ipnet::Ipv4Net::new(v4, n.prefix_len())?),
            IpNet::V6(n) => IpNet::V6(ipnet::Ipv6Net::new(v6, n.prefix_len())?),
        };
        if !net.contains(&a.addr()) {
            bail!("the server gave address {a} outside the plane {net}");
        }
        addresses.push(a);
    }
    let server_only = vec![
        IpNet::V4(ipnet::Ipv4Net::new(
            answer
                .server_tunnel_ipv4
                .parse()
                .context("server_tunnel_ipv4")?,
            32,
        )?),
        IpNet::V6(ipnet::Ipv6Net::new(
            answer
                .server_tunnel_ipv6
                .parse()
                .context("server_tunnel_ipv6")?,
            128,
        )?),
    ];
    let device = DeviceConfig {
        private_key: Some(private_key),
        listen_port: None,
        fwmark: None,
        peers: vec![PeerConfig {
            public_key: answer
                .server_wg_pubkey
                .parse()
                .context("server_wg_pubkey")?,
            preshared_key: None,
            endpoint: Some(
                answer
                    .server_wg_endpoint
                    .parse()
                    .context("server_wg_endpoint must be ip:port")?,
            ),
            persistent_keepalive: Some(25),
            allowed_ips: server_only,
        }],
    };
    let link = LinkConfig {
        up: true,
        mtu: Some(crate::server::CLIENT_MTU),
        addresses,
        routes: Vec::new(),
        table: crate::server::CLIENT_TABLE,
        rule_priority: None,
    };
    Ok((device, link))
}

/// `lemonade-nexus join URL`: loads (or creates) this device's identity, joins over pinned
/// HTTPS, programs the local WireGuard interface and its addresses, and saves the answer in
/// `<data dir>/join.json` (mode 0600: it holds the token) and the interface in `agent.json`.
/// Running it again keeps the identity, so the server answers with the same node and address.
///
/// Unless `--once`, it then stays in the foreground as the agent: every `--interval` seconds it
/// joins again with the same identity (the server keeps node and address, and re-programs its
/// peer) and reconciles the local interface, so drift on either side is corrected. A failed
/// round is logged and retried next round; the interface stays up. SIGINT or SIGTERM stop the
/// agent cleanly and leave the tunnel in place (`leave` removes it).
pub fn join_command(cfg: &Config, args: JoinArgs, out: &mut dyn std::io::Write) -> Result<()> {
    use ring::rand::SystemRandom;
    use std::os::unix::fs::DirBuilderExt;
    let url = JoinUrl::parse(&args.url)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    crate::identity::check_master_outside(&cfg.master_key_file, &cfg.data_dir)?;
    let master =
        crate::identity::MasterKey::load_or_create(&cfg.master_key_file, &SystemRandom::new())?;
    let (id, _) =
        crate::identity::Identity::load_or_create(&cfg.data_dir, &master, &SystemRandom::new())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = PinnedClient::new(url.clone())?;
    let mut mesh = Vec::new();
    let answer = rt.block_on(round(cfg, &args, &id, &client, &mut mesh))?;
    writeln!(out, "joined {} as node {}", url.host, answer.node_id)?;
    writeln!(
        out,
        "tunnel addresses: {} {}",
        answer.tunnel_ipv4, answer.tunnel_ipv6
    )?;
    writeln!(
        out,
        "server: {} (WireGuard {})",
        answer.server_wg_endpoint, answer.server_wg_pubkey
    )?;
    if !args.no_dataplane {
        writeln!(out, "interface: {}", args.wg_interface)?;
    }
    if args.once {
        return Ok(());
    }
    writeln!(
        out,
        "agent running: refreshing every {} s (stop with Ctrl-C; `lemonade-nexus leave` removes the tunnel)",
        args.interval
    )?;
    out.flush()?;
    rt.block_on(agent_loop(cfg, &args, &id, &client, mesh))?;
    writeln!(out, "agent stopped; the tunnel stays up")?;
    Ok(())
}

/// One agent round: join (idempotent for this identity), save the answer, program the interface
/// with the server peer and the permitted peers of the group (`mesh`: the last known ones, kept
/// when the private API cannot be asked this round, so direct traffic is not interrupted).
async fn round(
    cfg: &Config,
    args: &JoinArgs,
    id: &crate::identity::Identity,
    client: &PinnedClient,
    mesh: &mut Vec<PeerConfig>,
) -> Result<JoinResponse> {
    let answer = client
        .join_with_key(
            &id.node,
            &id.wireguard.public_base64(),
            args.hostname.as_deref(),
            args.setup_key.as_deref(),
        )
        .await?;
    crate::identity::write_atomic(
        &crate::status::join_state_path(&cfg.data_dir),
        &serde_json::to_vec_pretty(&answer)?,
    )?;
    let url = JoinUrl::parse(&args.url)?;
    let agent = crate::status::AgentState {
        server: format!("{}:{}", url.host, url.port),
        interface: (!args.no_dataplane).then(|| args.wg_interface.clone()),
    };
    crate::identity::write_atomic(
        &crate::status::agent_state_path(&cfg.data_dir),
        &serde_json::to_vec_pretty(&agent)?,
    )?;
    if !args.no_dataplane {
        let private = PrivateKey(
            id.wireguard
                .private_base64()
                .parse()
                .context("the WireGuard identity key")?,
        );
        let (mut device, link) = client_device(&answer, private)?;
        device.peers.extend(mesh.iter().cloned());
        program(cfg, &args.wg_interface, &device, &link).await?;
        // The private API is reached through the tunnel just programmed.
        match sync_mesh(cfg, args, &answer, &client.url).await {
            Ok(peers) if peers != *mesh => {
                *mesh = peers;
                device.peers.truncate(1);
                device.peers.extend(mesh.iter().cloned());
                program(cfg, &args.wg_interface, &device, &link).await?;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("mesh peers not refreshed (keeping the last known): {e:#}"),
        }
    }
    Ok(answer)
}

/// Reports this device's endpoint (`POST /api/heartbeat`) and asks for its group's peers
/// (`GET /api/mesh/peers`), on the private API through the tunnel, with the join token.
async fn sync_mesh(
    cfg: &Config,
    args: &JoinArgs,
    answer: &JoinResponse,
    public: &JoinUrl,
) -> Result<Vec<PeerConfig>> {
    let (host, port) = answer
        .private_api
        .strip_prefix("https://")
        .and_then(|r| r.rsplit_once(':'))
        .with_context(|| {
            format!(
                "private_api {:?} is not https://HOST:PORT",
                answer.private_api
            )
        })?;
    let url = JoinUrl {
        host: host.trim_matches(['[', ']']).to_owned(),
        port: port.parse().context("private_api port")?,
        // The private API serves the same certificate as the public one.
        pin: public.pin,
    };
    let private = PinnedClient::new(url)?.with_bearer(&answer.token);
    let endpoint = local_endpoint(cfg, &args.wg_interface, &answer.server_wg_endpoint).await?;
    private
        .post(
            "/api/heartbeat",
            &serde_json::json!({ "endpoint": endpoint.to_string() }),
        )
        .await?
        .json::<serde_json::Value>()?;
    let peers: crate::api::private::mesh::PeersResponse =
        private.get("/api/mesh/peers").await?.json()?;
    mesh_peers(&peers)
}

/// This device's WireGuard endpoint as the server's side of the underlay sees it: the local
/// address the kernel picks toward the server, and the device's listen port. (Behind NAT this is
/// the inside address; such peers still reach each other through nothing but the server, which
/// does not forward between devices.)
async fn local_endpoint(cfg: &Config, ifname: &str, server: &str) -> Result<std::net::SocketAddr> {
    use lemonade_nexus_netlink::WgBackend;
    let server: std::net::SocketAddr = server.parse().context("server_wg_endpoint")?;
    let any: std::net::SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    // A connected UDP socket sends nothing; it only asks the kernel for the source address.
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(server)?;
    let ip = sock.local_addr()?.ip();
    let port = match backend(cfg).await? {
        crate::server::Backend::Kernel(b) => b.get(ifname).await?.listen_port,
        crate::server::Backend::Userspace(b) => b.get(ifname).await?.listen_port,
    };
    Ok(std::net::SocketAddr::new(ip, port))
}

/// The WireGuard peers of a mesh-peers answer: each peer with a reported endpoint, allowed IPs
/// its two tunnel addresses (more specific than the server peer's plane-wide prefixes, so traffic
/// to it goes direct). A peer without an endpoint is left out until it reports one. Pure.
pub fn mesh_peers(answer: &crate::api::private::mesh::PeersResponse) -> Result<Vec<PeerConfig>> {
    let mut out = Vec::new();
    for p in &answer.peers {
        let Some(endpoint) = &p.endpoint else {
            continue;
        };
        out.push(PeerConfig {
            public_key: p
                .wg_pubkey
                .parse()
                .with_context(|| format!("peer {} wg_pubkey", p.node_id))?,
            preshared_key: None,
            endpoint: Some(
                endpoint
                    .parse()
                    .with_context(|| format!("peer {} endpoint {endpoint:?}", p.node_id))?,
            ),
            persistent_keepalive: Some(25),
            allowed_ips: p
                .allowed_ips
                .iter()
                .map(|a| {
                    a.parse::<IpNet>()
                        .with_context(|| format!("allowed IP {a:?}"))
                })
                .collect::<Result<_>>()?,
        });
    }
    Ok(out)
}

/// Runs rounds every `args.interval` seconds until SIGINT or SIGTERM.
async fn agent_loop(
    cfg: &Config,
    args: &JoinArgs,
    id: &crate::identity::Identity,
    client: &PinnedClient,
    mut mesh: Vec<PeerConfig>,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let period = Duration::from_secs(args.interval);
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
        // A signal during a round is buffered and ends the loop right after it (each request
        // is bounded by REQUEST_TIMEOUT).
        match round(cfg, args, id, client, &mut mesh).await {
            Ok(a) => tracing::debug!(node = %a.node_id, "agent round: joined and reconciled"),
            Err(e) => tracing::warn!("agent round failed (retrying in {period:?}): {e:#}"),
        }
    }
}

/// `lemonade-nexus leave`: removes the local WireGuard interface (its addresses and connected
/// routes go with it) and the saved join state. The identity stays, so joining again gives the
/// same node and address.
pub fn leave_command(cfg: &Config, args: LeaveArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let dir = &cfg.data_dir;
    let agent = crate::status::read_agent_state(dir)?;
    let join_path = crate::status::join_state_path(dir);
    let ifname = args
        .wg_interface
        .or_else(|| agent.as_ref().and_then(|a| a.interface.clone()));
    if agent.is_none() && !join_path.exists() && ifname.is_none() {
        writeln!(out, "not joined: nothing to leave in {}", dir.display())?;
        return Ok(());
    }
    if let Some(ifname) = &ifname {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let removed = rt.block_on(remove_device(ifname))?;
        if removed {
            writeln!(out, "removed interface {ifname}")?;
        } else {
            writeln!(out, "interface {ifname} was already gone")?;
        }
    }
    for p in [join_path, crate::status::agent_state_path(dir)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
    }
    writeln!(
        out,
        "left; the identity in {} is kept (joining again keeps the same address)",
        dir.display()
    )?;
    Ok(())
}

/// Deletes `ifname` with whichever backend drives it. Returns false when it did not exist.
async fn remove_device(ifname: &str) -> Result<bool> {
    use lemonade_nexus_netlink::WgBackend;
    let uapi = lemonade_nexus_netlink::uapi::UapiBackend::new();
    if uapi
        .socket_path(ifname)
        .map(|p| p.exists())
        .unwrap_or(false)
    {
        uapi.delete_device(ifname)
            .await
            .with_context(|| format!("cannot remove WireGuard interface {ifname}"))?;
        return Ok(true);
    }
    let rtnl = lemonade_nexus_netlink::rtnl::Rtnl::connect()?;
    if rtnl.link(ifname).await?.is_none() {
        return Ok(false);
    }
    rtnl.delete_link(ifname)
        .await
        .with_context(|| format!("cannot remove interface {ifname}"))?;
    Ok(true)
}

async fn program(
    cfg: &Config,
    ifname: &str,
    device: &DeviceConfig,
    link: &LinkConfig,
) -> Result<()> {
    let backend = backend(cfg).await?;
    backend
        .ensure_device(ifname)
        .await
        .with_context(|| format!("cannot create WireGuard interface {ifname}"))?;
    backend.reconcile(ifname, device).await?;
    lemonade_nexus_netlink::rtnl::Rtnl::connect()?
        .reconcile_link(ifname, link)
        .await?;
    Ok(())
}

/// The WireGuard backend `--dataplane` asks for.
async fn backend(cfg: &Config) -> Result<crate::server::Backend> {
    use lemonade_nexus_netlink::BackendPreference;
    let pref = match cfg.dataplane {
        crate::config::Dataplane::Auto => BackendPreference::Auto,
        crate::config::Dataplane::Kernel => BackendPreference::Kernel,
        crate::config::Dataplane::Userspace => BackendPreference::Userspace,
    };
    crate::server::Backend::choose(pref).await
}
