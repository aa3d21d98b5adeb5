//! Connection uids: Zeek's `C` and 17 base-62 digits, derived from a connection's key
//! and first packet time under a seed.

use std::hash::{BuildHasher, RandomState};

use monitor_common::flow::FlowKey;
use serde::{Deserialize, Serialize};

/// Zeek-like connection ids: `C` and 17 base-62 digits, derived from the connection's key
/// and first packet time under a seed. Another agent with the same seed (a restart with
/// `--state-dir`) names the connections it takes over as the last one did.
#[derive(Debug, Clone, Copy)]
pub struct Uids {
    seed: [u64; 2],
}

impl Uids {
    pub fn new(seed: [u64; 2]) -> Self {
        Self { seed }
    }

    /// A seed of this process's own.
    pub fn random_seed() -> [u64; 2] {
        let state = RandomState::new();
        [state.hash_one(1u8), state.hash_one(2u8)]
    }

    pub fn seed(&self) -> [u64; 2] {
        self.seed
    }

    pub(super) fn uid(&self, key: &FlowKey, first_ns: u64) -> Uid {
        let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        let words = [
            word(&key.addr_a[..8]),
            word(&key.addr_a[8..]),
            word(&key.addr_b[..8]),
            word(&key.addr_b[8..]),
            u64::from(key.port_a) << 32
                | u64::from(key.port_b) << 16
                | u64::from(key.proto) << 8
                | u64::from(key.family),
            first_ns,
        ];
        let hash = |seed: u64| {
            words.iter().fold(seed, |h, w| {
                splitmix(h ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15)
            })
        };
        let n = (u128::from(hash(self.seed[0])) << 64) | u128::from(hash(self.seed[1]));
        Uid::from(n % UID_RANGE)
    }
}

/// A connection's uid: shown as `C` and 17 base-62 digits (Zeek's form), kept as the
/// number (16 bytes, no allocation per connection), high half first. Two `u64`s rather
/// than a `u128`, whose 16-byte alignment would pad every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Uid([u64; 2]);

impl From<u128> for Uid {
    fn from(n: u128) -> Self {
        Uid([(n >> 64) as u64, n as u64])
    }
}

impl From<Uid> for u128 {
    fn from(Uid([hi, lo]): Uid) -> Self {
        (u128::from(hi) << 64) | u128::from(lo)
    }
}

const UID_DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const UID_LEN: usize = 17;
/// 62^17: the uids that 17 digits show (about 2^101).
const UID_RANGE: u128 = 62u128.pow(UID_LEN as u32);

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = [b'C'; UID_LEN + 1];
        let mut n = u128::from(*self);
        for digit in &mut text[1..] {
            *digit = UID_DIGITS[(n % 62) as usize];
            n /= 62;
        }
        f.write_str(std::str::from_utf8(&text).expect("ASCII digits"))
    }
}

impl std::str::FromStr for Uid {
    type Err = String;

    /// `C` and up to 17 base-62 digits, least significant first (as displayed).
    fn from_str(text: &str) -> Result<Self, String> {
        let digits = text
            .strip_prefix('C')
            .filter(|d| (1..=UID_LEN).contains(&d.len()))
            .ok_or_else(|| format!("not a connection uid: {text:?}"))?;
        digits.bytes().rev().try_fold(Uid::default(), |uid, b| {
            let d = UID_DIGITS
                .iter()
                .position(|&x| x == b)
                .ok_or_else(|| format!("not a connection uid: {text:?}"))?;
            Ok(Uid::from(u128::from(uid) * 62 + d as u128))
        })
    }
}

impl Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Uid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
