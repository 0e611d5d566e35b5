//! TLS for the HTTPS APIs (rustls 0.23, ring only).
//!
//! * The server uses a configured certificate chain and key (PEM), or by default a self-signed
//!   certificate generated once with `rcgen` and kept in `<data dir>/tls/` (key mode 0600).
//! * Either way the server prints the certificate's **pin**: `sha256:<hex of SHA-256(DER of the
//!   leaf certificate)>`. The join URL carries it (`https://host:9100/#pin=sha256:...`), and the
//!   client accepts exactly that certificate ([`PinVerifier`]): no CA, no hostname check, but the
//!   server must still prove possession of the certificate's key in the handshake (the signature
//!   checks are rustls' own). A client never talks to an unverified server.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ring::digest::{SHA256, digest};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The file names of the generated certificate inside `<data dir>/tls/`.
pub const GENERATED_CERT_FILE: &str = "api-cert.pem";
/// See [`GENERATED_CERT_FILE`].
pub const GENERATED_KEY_FILE: &str = "api-key.pem";

/// The SHA-256 pin of a certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin(pub [u8; 32]);

impl Pin {
    /// The pin of a DER certificate.
    pub fn of(cert_der: &[u8]) -> Pin {
        let d = digest(&SHA256, cert_der);
        let mut p = [0u8; 32];
        p.copy_from_slice(d.as_ref());
        Pin(p)
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({self})")
    }
}

/// Text that is not `sha256:` followed by 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a certificate pin: expected sha256:<64 hex digits>")]
pub struct PinParseError;

impl std::str::FromStr for Pin {
    type Err = PinParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s.trim().strip_prefix("sha256:").ok_or(PinParseError)?;
        let bytes = hex::decode(hexpart).map_err(|_| PinParseError)?;
        Ok(Pin(bytes.try_into().map_err(|_| PinParseError)?))
    }
}

/// The process-wide crypto provider: ring, never aws-lc.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server certificate chain and key, and the pin of its leaf.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub pin: Pin,
    /// Whether it was generated (and where it is stored).
    pub generated: Option<PathBuf>,
}

/// Loads the configured certificate (`cert` and `key`, PEM), or loads/generates the default
/// self-signed one in `<data_dir>/tls/` (its subject names are `names`, e.g. the public host).
pub fn load_or_generate(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
    names: &[String],
) -> Result<ServerCert> {
    let (cert_path, key_path, generated) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned(), false),
        (None, None) => {
            let dir = data_dir.join("tls");
            let c = dir.join(GENERATED_CERT_FILE);
            let k = dir.join(GENERATED_KEY_FILE);
            if !c.exists() || !k.exists() {
                generate_into(&dir, &c, &k, names)?;
            }
            (c, k, true)
        }
        _ => bail!(
            "--tls-cert and --tls-key must be given together (or neither, for a generated certificate)"
        ),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("cannot read TLS certificate {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("TLS certificate {} is not valid PEM", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        bail!(
            "TLS certificate file {} holds no certificate",
            cert_path.display()
        );
    };
    let pin = Pin::of(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read TLS private key {}", key_path.display()))?;
    Ok(ServerCert {
        chain,
        key,
        pin,
        generated: generated.then_some(cert_path),
    })
}

fn generate_into(dir: &Path, cert: &Path, key: &Path, names: &[String]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut names = names.to_vec();
    if names.is_empty() {
        names.push("lemonade-nexus".into());
    }
    let ck = rcgen::generate_simple_self_signed(names).context("generating the TLS certificate")?;
    // Key first: a certificate without its key would be useless on the next start.
    crate::identity::write_atomic(key, ck.signing_key.serialize_pem().as_bytes())
        .context("writing the generated TLS key")?;
    crate::identity::write_atomic(cert, ck.cert.pem().as_bytes())
        .context("writing the generated TLS certificate")?;
    Ok(())
}

/// The rustls server configuration for the API (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(cert: &ServerCert) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .context("TLS certificate and key do not match or are unsupported")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts exactly the certificate with the given pin (see the module docs).
#[derive(Debug)]
pub struct PinVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    pub fn new(pin: Pin) -> Self {
        PinVerifier {
            pin,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Pin::of(end_entity);
        // Pins are public values; a plain comparison leaks nothing secret.
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate pin {got} does not match the expected {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that trusts only the certificate with `pin`.
pub fn pinned_client_config(pin: Pin) -> Result<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier::new(pin)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A join URL: `https://host:port/#pin=sha256:...`. Returns the base URL parts and the pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinUrl {
    pub host: String,
    pub port: u16,
    pub pin: Pin,
}

impl JoinUrl {
    /// Parses `https://HOST[:PORT][/]#pin=sha256:HEX`. The pin is required.
    pub fn parse(url: &str) -> Result<JoinUrl> {
        let rest = url
            .trim()
            .strip_prefix("https://")
            .context("join URL must start with https://")?;
        let (before, fragment) = rest.split_once('#').context(
            "join URL has no #pin=sha256:... fragment; ask the server operator for the full URL",
        )?;
        let pin: Pin = fragment
            .strip_prefix("pin=")
            .context("join URL fragment must be pin=sha256:...")?
            .parse()?;
        let authority = before.trim_end_matches('/');
        if authority.contains('/') {
            bail!("join URL must have no path");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port: u16 = p.parse().context("join URL port is not a number")?;
                (
                    h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                    port,
                )
            }
            _ => (authority.to_owned(), 443),
        };
        if host.is_empty() {
            bail!("join URL has no host");
        }
        Ok(JoinUrl { host, port, pin })
    }
}

impl fmt::Display for JoinUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}/#pin={}", self.host, self.port, self.pin)
        } else {
            write!(f, "https://{}:{}/#pin={}", self.host, self.port, self.pin)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_round_trips_and_rejects_garbage() {
        let p = Pin::of(b"certificate");
        assert_eq!(p.to_string().parse::<Pin>().expect("parse"), p);
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            "sha256:zz",
            &format!("sha256:{}", "ab".repeat(31)),
        ] {
            assert!(bad.parse::<Pin>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn join_url_parses_and_prints() {
        let p = Pin::of(b"x");
        let u = JoinUrl::parse(&format!("https://10.0.0.1:9100/#pin={p}")).expect("parse");
        assert_eq!((u.host.as_str(), u.port, u.pin), ("10.0.0.1", 9100, p));
        assert_eq!(JoinUrl::parse(&u.to_string()).expect("again"), u);
        let v6 = JoinUrl::parse(&format!("https://[fd00::1]:9100#pin={p}")).expect("v6");
        assert_eq!(v6.host, "fd00::1");
        assert_eq!(JoinUrl::parse(&v6.to_string()).expect("v6 again"), v6);
        assert!(JoinUrl::parse("https://10.0.0.1:9100/").is_err(), "no pin");
        assert!(
            JoinUrl::parse(&format!("http://h:1/#pin={p}")).is_err(),
            "http"
        );
        assert!(
            JoinUrl::parse(&format!("https://h:1/x#pin={p}")).is_err(),
            "path"
        );
    }

    #[test]
    fn generated_certificate_is_kept_across_starts() {
        let d = tempfile::tempdir().expect("tmp");
        let a = load_or_generate(None, None, d.path(), &["localhost".into()]).expect("gen");
        let b = load_or_generate(None, None, d.path(), &[]).expect("load");
        assert_eq!(a.pin, b.pin);
        assert!(a.generated.is_some());
        server_config(&a).expect("usable by rustls");
        let key = d.path().join("tls").join(GENERATED_KEY_FILE);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
