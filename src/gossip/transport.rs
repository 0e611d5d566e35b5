//! QUIC for gossip (quinn, rustls with ring only), authenticated by the servers' Ed25519 keys.
//!
//! Each server presents a self-signed X.509 certificate for its Ed25519 identity key (made with
//! `rcgen`, signed through the key itself, never exported) and requires one from the peer. The
//! certificates are not checked against any CA: custom rustls verifiers on both sides
//! ([`PeerVerifier`]) take the peer's Ed25519 key from the certificate, verify the TLS 1.3
//! handshake signature against exactly that key with ring, and refuse keys the replicated
//! state says are revoked. What the key is allowed to do is decided after the handshake: the
//! first message on every connection is a `Hello` carrying the peer's root-signed server
//! certificate, which must name the key the TLS handshake authenticated (see `super::node`).
//!
//! TLS 1.3 only, ALPN `ln-gossip/1`, QUIC datagrams enabled.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature_with_raw_key};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::keys::PublicKey;

/// The ALPN protocol of gossip connections.
pub const ALPN: &[u8] = b"ln-gossip/1";
/// The TLS server name clients ask for (not checked: the key is the identity).
pub const SERVER_NAME: &str = "lemonade-nexus-gossip";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Signs with the server's identity key (ring's Ed25519 key pair stays where it is).
pub type SignFn = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// The SPKI DER of an Ed25519 key.
fn spki_of(key: &PublicKey) -> Vec<u8> {
    let mut v = ED25519_SPKI_PREFIX.to_vec();
    v.extend_from_slice(key.as_bytes());
    v
}

/// The Ed25519 key a certificate is for: its (only) Ed25519 SubjectPublicKeyInfo. A certificate
/// holding that structure more than once is refused as ambiguous.
pub fn key_of_cert(der: &[u8]) -> Option<PublicKey> {
    let positions: Vec<usize> = der
        .windows(ED25519_SPKI_PREFIX.len())
        .enumerate()
        .filter(|(_, w)| *w == ED25519_SPKI_PREFIX)
        .map(|(i, _)| i)
        .collect();
    let [at] = positions[..] else {
        return None;
    };
    let start = at + ED25519_SPKI_PREFIX.len();
    let key: [u8; 32] = der.get(start..start + 32)?.try_into().ok()?;
    Some(PublicKey(key))
}

/// rcgen and rustls signing through [`SignFn`].
struct IdentityKey {
    public: PublicKey,
    spki: Vec<u8>,
    sign: SignFn,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityKey({})", self.public)
    }
}

impl rcgen::PublicKeyData for IdentityKey {
    fn der_bytes(&self) -> &[u8] {
        self.public.as_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl rcgen::SigningKey for IdentityKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok((self.sign)(msg))
    }
}

#[derive(Debug)]
struct TlsSigner(Arc<IdentityKey>);

impl rustls::sign::SigningKey for TlsSigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(TlsSigner(self.0.clone())) as Box<dyn rustls::sign::Signer>)
    }
    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.spki.as_slice()))
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ED25519
    }
}

impl rustls::sign::Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok((self.0.sign)(message))
    }
    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Keys refused at the handshake (revoked servers), shared with the node that updates it.
pub type Revoked = Arc<RwLock<BTreeSet<PublicKey>>>;

/// Verifies the peer's certificate and handshake signature by its Ed25519 key (both roles).
#[derive(Debug)]
pub struct PeerVerifier {
    revoked: Revoked,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn check_cert(&self, der: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
        let key = key_of_cert(der).ok_or_else(|| {
            rustls::Error::General("gossip peer certificate holds no single Ed25519 key".into())
        })?;
        if self
            .revoked
            .read()
            .map(|r| r.contains(&key))
            .unwrap_or(true)
        {
            return Err(rustls::Error::General(format!(
                "gossip peer {key} is revoked"
            )));
        }
        Ok(key)
    }

    fn check_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let key = self.check_cert(cert)?;
        let spki = spki_of(&key);
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki.as_slice()),
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_cert(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("gossip is TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_cert(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("gossip is TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The peer key a connection authenticated (from its certificate).
pub fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let id = conn.peer_identity()?;
    let certs = id.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    key_of_cert(certs.first()?.as_ref())
}

/// Builds a QUIC endpoint bound to `listen` that accepts and makes gossip connections as the
/// server whose key is `public` (signing through `sign`), refusing the keys in `revoked`.
pub fn endpoint(
    listen: std::net::SocketAddr,
    public: PublicKey,
    sign: SignFn,
    revoked: Revoked,
) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = Arc::new(IdentityKey {
        public,
        spki: spki_of(&public),
        sign,
    });
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .context("gossip certificate parameters")?;
    let cert = params
        .self_signed(key.as_ref())
        .context("self-signing the gossip certificate")?;
    let certified = Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        Arc::new(TlsSigner(key.clone())),
    ));
    let verifier = Arc::new(PeerVerifier {
        revoked,
        provider: provider.clone(),
    });

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            certified.clone(),
        )));
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    client.alpn_protocols = vec![ALPN.to_vec()];

    let transport = Arc::new(transport_config());
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .context("QUIC server configuration")?,
    ));
    server_cfg.transport_config(transport.clone());
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .context("QUIC client configuration")?,
    ));
    client_cfg.transport_config(transport);
    let mut ep = quinn::Endpoint::server(server_cfg, listen)
        .with_context(|| format!("cannot listen for gossip on {listen} (udp)"))?;
    ep.set_default_client_config(client_cfg);
    Ok(ep)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Dead connections close within seconds; SWIM decides liveness, this frees resources.
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("small timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.datagram_receive_buffer_size(Some(1 << 20));
    t.datagram_send_buffer_size(1 << 20);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_read_back_from_the_generated_certificate() {
        let node = crate::testkit::key(7);
        let public = node.public();
        let node = Arc::new(node);
        let sign: SignFn = Arc::new(move |m| node.pair().sign(m).as_ref().to_vec());
        let key = IdentityKey {
            public,
            spki: spki_of(&public),
            sign,
        };
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).expect("p");
        let cert = params.self_signed(&key).expect("self-signed");
        assert_eq!(key_of_cert(cert.der()), Some(public));
        // Two SPKIs: ambiguous, refused.
        let mut twice = cert.der().to_vec();
        twice.extend_from_slice(&spki_of(&crate::testkit::key(8).public()));
        assert_eq!(key_of_cert(&twice), None);
    }
}
