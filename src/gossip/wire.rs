//! The gossip messages between servers and their encoding (CDDL: `data-schema/gossip.cddl`).
//!
//! Everything is deterministic CBOR (ciborium, like the signed objects; see `crate::signed`):
//! * **datagrams** ([`Datagram`]): pushed ops and SWIM membership packets, each at most the
//!   connection's `max_datagram_size()` (about 1.2 KB);
//! * **streams**: the first bidirectional stream of a connection carries the [`Hello`] exchange;
//!   every later one carries one [`Request`] and its [`Response`] (anti-entropy). Each stream
//!   message is one CBOR item preceded by its length (u32, big endian).
//!
//! Gossip messages are not signed: the QUIC connection authenticates the peer, so the author of a
//! message is the connection's peer. The ops inside are signed envelopes that the store verifies.
//!
//! Decoding is bounded: the input size is checked first ([`MAX_DATAGRAM_BYTES`],
//! [`MAX_STREAM_MESSAGE_BYTES`]), nesting depth is limited, element counts are checked after
//! decoding, and any malformed input is an error, never a panic (property-tested).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::PublicKey;

/// The gossip protocol version in [`Hello`]; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest datagram accepted for decoding (real ones are bounded by the path MTU, ~1.2 KB).
pub const MAX_DATAGRAM_BYTES: usize = 64 * 1024;
/// Largest stream message accepted (a fetch response is bounded well below this).
pub const MAX_STREAM_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Most ops one fetch response carries.
pub const MAX_FETCH_OPS: u64 = 1024;
/// Most op bytes one fetch response carries (the last op may cross it).
pub const MAX_FETCH_BYTES: usize = 1024 * 1024;
/// Most origins in a heads vector (servers of one cluster, with a wide margin).
pub const MAX_ORIGINS: usize = 4096;
/// Most ops in one datagram.
pub const MAX_OPS_PER_DATAGRAM: usize = 64;

/// Opaque bytes, encoded as a CBOR byte string (not an array of integers).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// The highest contiguous seq of one origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub origin: PublicKey,
    pub seq: u64,
}

/// The first message each side sends on a new connection (on the first bidirectional stream).
/// Nothing else is accepted from the peer before its Hello has been verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// [`cluster_id`]: servers of different clusters (root key or overlay configuration) refuse
    /// each other with a clear message instead of mixing logs.
    pub cluster: Blob,
    /// The sender's server certificate (a root-signed envelope, see `crate::trust`), which must
    /// name the key the TLS handshake authenticated. Empty when the cluster has no certificates
    /// (a single-root test cluster where the root admits servers by key, see `crate::gossip`).
    pub cert: Blob,
    /// Where the sender accepts gossip connections (`host:port`), for SWIM and re-connects.
    pub gossip_addr: String,
    /// The sender's heads: the receiver starts anti-entropy right away if it lags.
    pub heads: Vec<Head>,
}

/// A datagram between two connected servers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Datagram {
    /// Signed op envelopes (pushed; at most [`MAX_OPS_PER_DATAGRAM`]).
    Ops(Vec<Blob>),
    /// A SWIM packet (foca's encoding), see `super::membership`.
    Swim(Blob),
}

/// A request on its own bidirectional stream (anti-entropy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// "Here are my heads; what are yours?" Answered by [`Response::Heads`].
    Heads(Vec<Head>),
    /// The ops of `origin` with seq in `from..=to`, answered by [`Response::Ops`] with at most
    /// [`MAX_FETCH_OPS`] ops / about [`MAX_FETCH_BYTES`] bytes, in seq order from `from`.
    Fetch {
        origin: PublicKey,
        from: u64,
        to: u64,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Heads(Vec<Head>),
    /// Consecutive ops from the requested `from`; fewer than asked when the bound was reached
    /// (the requester asks again from where it ended).
    Ops(Vec<Blob>),
    /// The request was refused (reason for the log).
    Refused(String),
}

/// Why bytes from a peer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("gossip message of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed gossip message: {0}")]
    Malformed(&'static str),
    #[error("gossip message has {count} {what}, more than the limit of {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
}

/// Encodes a message (deterministic CBOR).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    crate::signed::to_cbor(value)
}

fn decode_bounded<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    max: usize,
) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let mut reader = bytes;
    let value: T = ciborium::de::from_reader_with_recursion_limit(&mut reader, 16)
        .map_err(|_| WireError::Malformed("not a valid encoding of the expected message"))?;
    if !reader.is_empty() {
        return Err(WireError::Malformed("trailing bytes after the message"));
    }
    Ok(value)
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), WireError> {
    if count > max {
        return Err(WireError::TooMany { what, count, max });
    }
    Ok(())
}

/// Decodes a datagram.
pub fn decode_datagram(bytes: &[u8]) -> Result<Datagram, WireError> {
    let d: Datagram = decode_bounded(bytes, MAX_DATAGRAM_BYTES)?;
    if let Datagram::Ops(ops) = &d {
        check_count("ops", ops.len(), MAX_OPS_PER_DATAGRAM)?;
    }
    Ok(d)
}

/// Decodes a Hello.
pub fn decode_hello(bytes: &[u8]) -> Result<Hello, WireError> {
    let h: Hello = decode_bounded(bytes, MAX_DATAGRAM_BYTES * 4)?;
    check_count("heads", h.heads.len(), MAX_ORIGINS)?;
    if h.cluster.0.len() != 32 {
        return Err(WireError::Malformed("cluster id is not 32 bytes"));
    }
    Ok(h)
}

/// Decodes a stream request.
pub fn decode_request(bytes: &[u8]) -> Result<Request, WireError> {
    let r: Request = decode_bounded(bytes, MAX_DATAGRAM_BYTES * 4)?;
    if let Request::Heads(h) = &r {
        check_count("heads", h.len(), MAX_ORIGINS)?;
    }
    Ok(r)
}

/// Decodes a stream response.
pub fn decode_response(bytes: &[u8]) -> Result<Response, WireError> {
    let r: Response = decode_bounded(bytes, MAX_STREAM_MESSAGE_BYTES)?;
    match &r {
        Response::Heads(h) => check_count("heads", h.len(), MAX_ORIGINS)?,
        Response::Ops(o) => check_count("ops", o.len(), MAX_FETCH_OPS as usize)?,
        Response::Refused(_) => {}
    }
    Ok(r)
}

/// The cluster id: SHA-256 over a tag, the root key and the overlay (IPAM) configuration. Two
/// servers gossip only if their ids are equal.
pub fn cluster_id(root: &PublicKey, ipam: &crate::ipam::IpamConfig) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"lemonade-nexus/cluster-id/v1\0");
    ctx.update(root.as_bytes());
    ctx.update(&encode(ipam));
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Heads as a wire vector (sorted by origin).
pub fn heads_to_wire(heads: &std::collections::BTreeMap<PublicKey, u64>) -> Vec<Head> {
    heads
        .iter()
        .map(|(origin, seq)| Head {
            origin: *origin,
            seq: *seq,
        })
        .collect()
}

/// The origin and seq an op envelope CLAIMS (its signer and nonce), without checking the
/// signature: enough to order and buffer it. The store verifies everything before appending.
pub fn peek_op(bytes: &[u8]) -> Option<(PublicKey, u64)> {
    let env = crate::signed::decode_unverified(bytes, crate::signed::TAG_OP).ok()?;
    Some((env.signer, env.nonce))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    #[test]
    fn messages_round_trip() {
        let d = Datagram::Ops(vec![Blob(vec![1, 2, 3]), Blob(vec![])]);
        assert_eq!(decode_datagram(&encode(&d)).expect("decodes"), d);
        let s = Datagram::Swim(Blob(vec![9; 100]));
        assert_eq!(decode_datagram(&encode(&s)).expect("decodes"), s);
        let h = Hello {
            version: PROTOCOL_VERSION,
            cluster: Blob(vec![7; 32]),
            cert: Blob(vec![1; 10]),
            gossip_addr: "127.0.0.1:9102".into(),
            heads: vec![Head {
                origin: key(1),
                seq: 5,
            }],
        };
        assert_eq!(decode_hello(&encode(&h)).expect("decodes"), h);
        let r = Request::Fetch {
            origin: key(2),
            from: 3,
            to: 9,
        };
        assert_eq!(decode_request(&encode(&r)).expect("decodes"), r);
        let a = Response::Ops(vec![Blob(vec![4; 40])]);
        assert_eq!(decode_response(&encode(&a)).expect("decodes"), a);
    }

    #[test]
    fn blobs_are_byte_strings() {
        let b = encode(&Blob(vec![1, 2, 3]));
        assert_eq!(b, vec![0x43, 1, 2, 3]);
    }

    #[test]
    fn limits_are_enforced() {
        let big = vec![0u8; MAX_DATAGRAM_BYTES + 1];
        assert!(matches!(
            decode_datagram(&big),
            Err(WireError::TooLarge { .. })
        ));
        let many = Datagram::Ops(vec![Blob(vec![]); MAX_OPS_PER_DATAGRAM + 1]);
        assert!(matches!(
            decode_datagram(&encode(&many)),
            Err(WireError::TooMany { .. })
        ));
        let mut trailing = encode(&Datagram::Swim(Blob(vec![1])));
        trailing.push(0);
        assert!(matches!(
            decode_datagram(&trailing),
            Err(WireError::Malformed(_))
        ));
        let bad_cluster = Hello {
            version: 1,
            cluster: Blob(vec![1; 3]),
            cert: Blob::default(),
            gossip_addr: String::new(),
            heads: vec![],
        };
        assert!(decode_hello(&encode(&bad_cluster)).is_err());
    }

    #[test]
    fn cluster_id_depends_on_root_and_overlay() {
        let cfg = crate::ipam::IpamConfig::default();
        let a = cluster_id(&key(1), &cfg);
        assert_eq!(a, cluster_id(&key(1), &cfg));
        assert_ne!(a, cluster_id(&key(2), &cfg));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_datagram(&bytes);
            let _ = decode_hello(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
            let _ = peek_op(&bytes);
        }

        #[test]
        fn mutated_messages_never_panic(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let h = Hello {
                version: 1,
                cluster: Blob(vec![7; 32]),
                cert: Blob(vec![1; 40]),
                gossip_addr: "10.0.0.1:9102".into(),
                heads: vec![Head { origin: key(3), seq: 77 }],
            };
            let mut b = encode(&h);
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            let _ = decode_hello(&b);
            let _ = decode_datagram(&b);
            let _ = decode_response(&b);
        }
    }
}
