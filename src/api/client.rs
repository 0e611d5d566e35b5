//! The client side of the public API: a small HTTPS/1.1 client that trusts exactly the pinned
//! certificate of the join URL ([`crate::tls::PinVerifier`]), and the join conversation
//! (challenge, proof, join). Used by the join agent and by the tests.
//!
//! One request per connection (`Connection: close`), bodies bounded to [`MAX_RESPONSE_BYTES`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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
}

impl PinnedClient {
    pub fn new(url: JoinUrl) -> Result<Self> {
        let cfg = pinned_client_config(url.pin)?;
        Ok(PinnedClient {
            url,
            connector: TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// Sends one request; `body` is sent as JSON when present.
    pub async fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .with_context(|| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response> {
        let (host, port) = (&self.url.host, self.url.port);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        let name = ServerName::try_from(host.clone()).context("server host is not a valid name")?;
        let mut tls = self.connector.connect(name, tcp).await.with_context(|| {
            format!("TLS handshake with {host}:{port} failed (certificate pin checked)")
        })?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes()).await?;
        if let Some(b) = body {
            tls.write_all(b).await?;
        }
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
        let proof = self.proof(key).await?;
        let body =
            serde_json::json!({ "proof": proof, "wg_pubkey": wg_pubkey, "hostname": hostname });
        self.post("/api/join", &body).await?.json()
    }
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
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = v.parse::<usize>().ok();
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .context("answer body shorter than its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
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
