//! The hybrid post-quantum key exchange `X25519MLKEM768` (TLS named group 0x11EC),
//! built on the ring provider: ML-KEM-768 (FIPS 203) from the pure-Rust `ml-kem`
//! crate, X25519 from the ring provider's own group.
//!
//! Wire format (draft-ietf-tls-ecdhe-mlkem), ML-KEM part first in all three:
//! - the client's key share is the ML-KEM-768 encapsulation key (1184 bytes)
//!   followed by its X25519 public key (32 bytes);
//! - the server's key share is the ML-KEM-768 ciphertext (1088 bytes) followed by
//!   its X25519 public key (32 bytes);
//! - the shared secret is the ML-KEM shared secret (32 bytes) followed by the
//!   X25519 shared secret (32 bytes).
//!
//! ML-KEM is a KEM, not a Diffie-Hellman exchange: the server's share depends on the
//! client's, so the server side is [`SupportedKxGroup::start_and_complete`]. Every
//! share received is checked for length (and the encapsulation key for the FIPS 203
//! modulus check) and refused with [`PeerMisbehaved::InvalidKeyShare`].
use std::{boxed::Box, sync::LazyLock, vec::Vec};

use ml_kem::{
    B32, Decapsulate, KeyExport, Seed,
    ml_kem_768::{Ciphertext, DecapsulationKey, EncapsulationKey},
};
use rustls::{
    Error, NamedGroup, PeerMisbehaved, ProtocolVersion,
    crypto::{ActiveKeyExchange, CompletedKeyExchange, SecureRandom, SharedSecret, SupportedKxGroup},
    ffdhe_groups::FfdheGroup,
};
use zeroize::Zeroize;

/// Length of an ML-KEM-768 encapsulation key.
pub const MLKEM768_ENCAPSULATION_KEY_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext.
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;
/// Length of an X25519 public key.
pub const X25519_PUBLIC_KEY_LEN: usize = 32;
/// Length of the client's key share.
pub const CLIENT_SHARE_LEN: usize = MLKEM768_ENCAPSULATION_KEY_LEN + X25519_PUBLIC_KEY_LEN;
/// Length of the server's key share.
pub const SERVER_SHARE_LEN: usize = MLKEM768_CIPHERTEXT_LEN + X25519_PUBLIC_KEY_LEN;
/// Length of the shared secret (ML-KEM's 32 bytes, then X25519's 32 bytes).
pub const SHARED_SECRET_LEN: usize = 64;

/// The `X25519MLKEM768` group, drawing its randomness from the ring provider.
pub fn x25519_mlkem768() -> &'static dyn SupportedKxGroup {
    static GROUP: LazyLock<X25519MlKem768> =
        LazyLock::new(|| X25519MlKem768 { random: rustls::crypto::ring::default_provider().secure_random });
    &*GROUP
}

#[derive(Debug)]
struct X25519MlKem768 {
    random: &'static dyn SecureRandom,
}

/// The classical half, shared with the stand-alone X25519 group.
fn x25519() -> &'static dyn SupportedKxGroup {
    rustls::crypto::ring::kx_group::X25519
}

fn invalid_share() -> Error {
    PeerMisbehaved::InvalidKeyShare.into()
}

fn combine(mlkem: &[u8], x25519: &SharedSecret) -> SharedSecret {
    let mut secret = Vec::with_capacity(SHARED_SECRET_LEN);
    secret.extend_from_slice(mlkem);
    secret.extend_from_slice(x25519.secret_bytes());
    SharedSecret::from(secret)
}

impl SupportedKxGroup for X25519MlKem768 {
    /// Client side: a fresh ML-KEM-768 key pair and a fresh X25519 key pair.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        // FIPS 203 ML-KEM.KeyGen: the 64-byte seed is its two random inputs d || z.
        let mut seed = Seed::default();
        self.random.fill(&mut seed)?;
        let decapsulation_key = DecapsulationKey::from_seed(seed);
        seed.as_mut_slice().zeroize();
        let x25519 = x25519().start()?;
        let mut share = Vec::with_capacity(CLIENT_SHARE_LEN);
        share.extend_from_slice(&decapsulation_key.encapsulation_key().to_bytes());
        share.extend_from_slice(x25519.pub_key());
        debug_assert_eq!(share.len(), CLIENT_SHARE_LEN);
        Ok(Box::new(ClientShare { decapsulation_key, x25519, share }))
    }

    /// Server side: encapsulate to the client's ML-KEM key, and X25519 with its public key.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != CLIENT_SHARE_LEN {
            return Err(invalid_share());
        }
        let (encapsulation_key, x25519_public) = client_share.split_at(MLKEM768_ENCAPSULATION_KEY_LEN);
        let encapsulation_key = encapsulation_key.try_into().map_err(|_| invalid_share())?;
        // Refuses keys whose coefficients are not reduced mod q (FIPS 203 section 7.2).
        let encapsulation_key = EncapsulationKey::new(&encapsulation_key).map_err(|_| invalid_share())?;
        let x25519 = x25519().start_and_complete(x25519_public)?;
        // FIPS 203 ML-KEM.Encaps: 32 random bytes m, then the deterministic part.
        let mut m = B32::default();
        self.random.fill(&mut m)?;
        let (ciphertext, mut mlkem_secret) = encapsulation_key.encapsulate_deterministic(&m);
        m.as_mut_slice().zeroize();
        let mut pub_key = Vec::with_capacity(SERVER_SHARE_LEN);
        pub_key.extend_from_slice(&ciphertext);
        pub_key.extend_from_slice(&x25519.pub_key);
        let secret = combine(&mlkem_secret, &x25519.secret);
        mlkem_secret.as_mut_slice().zeroize();
        Ok(CompletedKeyExchange { group: self.name(), pub_key, secret })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// A client's pending exchange.
struct ClientShare {
    decapsulation_key: DecapsulationKey,
    x25519: Box<dyn ActiveKeyExchange>,
    /// Encapsulation key || X25519 public key, as sent.
    share: Vec<u8>,
}

impl ActiveKeyExchange for ClientShare {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != SERVER_SHARE_LEN {
            return Err(invalid_share());
        }
        let (ciphertext, x25519_public) = server_share.split_at(MLKEM768_CIPHERTEXT_LEN);
        let ciphertext: Ciphertext = ciphertext.try_into().map_err(|_| invalid_share())?;
        let x25519 = self.x25519.complete(x25519_public)?;
        // Decapsulation never fails: a forged ciphertext gives an unrelated secret
        // (implicit rejection), and the handshake then fails at Finished.
        let mut mlkem_secret = self.decapsulation_key.decapsulate(&ciphertext);
        let secret = combine(&mlkem_secret, &x25519);
        mlkem_secret.as_mut_slice().zeroize();
        Ok(secret)
    }

    /// Lets the client also send this X25519 public key as a plain X25519 share (the
    /// same ephemeral key, as the hybrid design allows), so that a server without
    /// `X25519MLKEM768` answers without a `HelloRetryRequest`.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, &self.share[MLKEM768_ENCAPSULATION_KEY_LEN..]))
    }

    fn complete_hybrid_component(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        self.x25519.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random<const N: usize>() -> [u8; N] {
        let mut bytes = [0; N];
        rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).unwrap();
        bytes
    }

    /// The client side against a server assembled from the two components by hand:
    /// checks the share layout and the order of the secret's halves.
    #[test]
    fn client_share_and_secret_follow_the_wire_format() {
        let client = x25519_mlkem768().start().unwrap();
        assert_eq!(client.group(), NamedGroup::X25519MLKEM768);
        let share = client.pub_key().to_vec();
        assert_eq!(share.len(), CLIENT_SHARE_LEN);
        let (encapsulation_key, client_x25519) = share.split_at(MLKEM768_ENCAPSULATION_KEY_LEN);
        assert_eq!(client.hybrid_component(), Some((NamedGroup::X25519, client_x25519)));

        let encapsulation_key = EncapsulationKey::new(&encapsulation_key.try_into().unwrap()).unwrap();
        let (ciphertext, mlkem_secret) = encapsulation_key.encapsulate_deterministic(&random::<32>().into());
        let server_x25519 = x25519().start_and_complete(client_x25519).unwrap();
        let mut server_share = ciphertext.to_vec();
        server_share.extend_from_slice(&server_x25519.pub_key);

        let secret = client.complete(&server_share).unwrap();
        let secret = secret.secret_bytes();
        assert_eq!(secret.len(), SHARED_SECRET_LEN);
        assert_eq!(&secret[..32], mlkem_secret.as_slice());
        assert_eq!(&secret[32..], server_x25519.secret.secret_bytes());
    }

    /// The server side against a client assembled from the two components by hand.
    #[test]
    fn server_share_and_secret_follow_the_wire_format() {
        let decapsulation_key = DecapsulationKey::from_seed(random::<64>().into());
        let client_x25519 = x25519().start().unwrap();
        let mut client_share = decapsulation_key.encapsulation_key().to_bytes().to_vec();
        client_share.extend_from_slice(client_x25519.pub_key());

        let server = x25519_mlkem768().start_and_complete(&client_share).unwrap();
        assert_eq!(server.group, NamedGroup::X25519MLKEM768);
        assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
        let (ciphertext, server_x25519) = server.pub_key.split_at(MLKEM768_CIPHERTEXT_LEN);
        let mlkem_secret = decapsulation_key.decapsulate(&ciphertext.try_into().unwrap());
        let x25519_secret = client_x25519.complete(server_x25519).unwrap();
        let secret = server.secret.secret_bytes();
        assert_eq!(secret.len(), SHARED_SECRET_LEN);
        assert_eq!(&secret[..32], mlkem_secret.as_slice());
        assert_eq!(&secret[32..], x25519_secret.secret_bytes());
    }

    #[test]
    fn both_sides_agree_and_fresh_keys_differ() {
        let client = x25519_mlkem768().start().unwrap();
        let again = x25519_mlkem768().start().unwrap();
        assert_ne!(client.pub_key(), again.pub_key());
        let server = x25519_mlkem768().start_and_complete(client.pub_key()).unwrap();
        let secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn bad_shares_are_errors() {
        let invalid = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);
        let group = x25519_mlkem768();
        let good = group.start().unwrap().pub_key().to_vec();
        for len in [0, 32, MLKEM768_ENCAPSULATION_KEY_LEN, CLIENT_SHARE_LEN - 1, CLIENT_SHARE_LEN + 1, 4096] {
            let share = std::vec![1; len];
            assert_eq!(group.start_and_complete(&share).err(), Some(invalid.clone()), "client share of {len} bytes");
        }
        // Coefficients of 0xfff are not reduced mod q: not an encapsulation key.
        let mut unreduced = std::vec![0xff; MLKEM768_ENCAPSULATION_KEY_LEN];
        unreduced.extend_from_slice(&good[MLKEM768_ENCAPSULATION_KEY_LEN..]);
        assert_eq!(group.start_and_complete(&unreduced).err(), Some(invalid.clone()));
        // A valid encapsulation key with an X25519 key whose result is all zeros.
        let mut zero_x25519 = good[..MLKEM768_ENCAPSULATION_KEY_LEN].to_vec();
        zero_x25519.extend_from_slice(&[0; X25519_PUBLIC_KEY_LEN]);
        assert!(group.start_and_complete(&zero_x25519).is_err());

        for len in [0, 32, MLKEM768_CIPHERTEXT_LEN, SERVER_SHARE_LEN - 1, SERVER_SHARE_LEN + 1, CLIENT_SHARE_LEN] {
            let client = group.start().unwrap();
            assert_eq!(client.complete(&std::vec![1; len]).err(), Some(invalid.clone()), "server share of {len} bytes");
        }
        for len in [0, 31, 33, SERVER_SHARE_LEN] {
            let client = group.start().unwrap();
            assert!(client.complete_hybrid_component(&std::vec![1; len]).is_err(), "X25519 share of {len} bytes");
        }
    }

    #[test]
    fn only_for_tls13() {
        let group = x25519_mlkem768();
        assert!(group.usable_for_version(ProtocolVersion::TLSv1_3));
        assert!(!group.usable_for_version(ProtocolVersion::TLSv1_2));
        assert_eq!(u16::from(group.name()), 0x11ec);
    }
}
