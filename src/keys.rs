//! Ed25519 public keys: how every node, server and administrator is named in signed state.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ed25519 public key (32 bytes). Serialized as a CBOR byte string; displayed as base64.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// The error for text that is not a base64 Ed25519 public key.
#[derive(Debug, thiserror::Error)]
#[error("not an Ed25519 public key: expected base64 of exactly 32 bytes")]
pub struct PublicKeyParseError;

impl std::str::FromStr for PublicKey {
    type Err = PublicKeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD.decode(s.trim()).map_err(|_| PublicKeyParseError)?;
        Ok(PublicKey(
            bytes.try_into().map_err(|_| PublicKeyParseError)?,
        ))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PublicKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 32-byte Ed25519 public key")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<PublicKey, E> {
                let arr: [u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(PublicKey(arr))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbor_is_a_byte_string_and_round_trips() {
        let k = PublicKey([7; 32]);
        let mut buf = Vec::new();
        ciborium::into_writer(&k, &mut buf).expect("encode");
        assert_eq!(buf[0], 0x58, "major type 2 (bytes), one-byte length");
        assert_eq!(buf[1], 32);
        let back: PublicKey = ciborium::from_reader(&buf[..]).expect("decode");
        assert_eq!(back, k);
        let short = [0x58u8, 2, 1, 2];
        assert!(ciborium::from_reader::<PublicKey, _>(&short[..]).is_err());
    }

    #[test]
    fn text_round_trips_and_rejects_bad_lengths() {
        let k = PublicKey([9; 32]);
        assert_eq!(k.to_string().parse::<PublicKey>().expect("parse"), k);
        assert!("AAAA".parse::<PublicKey>().is_err());
        assert!("not base64!".parse::<PublicKey>().is_err());
    }
}
