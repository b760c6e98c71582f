//! The index of revoked serial numbers and the serial number forms.

use std::collections::HashMap;
use std::fmt;

/// Serial numbers up to this many content octets are stored inline in the
/// index. RFC 5280 section 4.1.2.2 caps conforming serials at 20 octets.
/// Longer ones go to a separate, boxed map.
const INLINE_SERIAL_LEN: usize = 20;

/// A serial number stored inline: the length, then the content octets
/// zero-padded to [`INLINE_SERIAL_LEN`].
pub(super) type InlineSerial = [u8; INLINE_SERIAL_LEN + 1];

/// Marks an absent reasonCode in [`RevokedEntry`].
const NO_REASON: u8 = u8::MAX;

/// A CRLReason (RFC 5280 section 5.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    RemoveFromCrl,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl CrlReason {
    pub(super) fn from_code(code: u8) -> Option<CrlReason> {
        Some(match code {
            0 => CrlReason::Unspecified,
            1 => CrlReason::KeyCompromise,
            2 => CrlReason::CaCompromise,
            3 => CrlReason::AffiliationChanged,
            4 => CrlReason::Superseded,
            5 => CrlReason::CessationOfOperation,
            6 => CrlReason::CertificateHold,
            8 => CrlReason::RemoveFromCrl,
            9 => CrlReason::PrivilegeWithdrawn,
            10 => CrlReason::AaCompromise,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            CrlReason::Unspecified => 0,
            CrlReason::KeyCompromise => 1,
            CrlReason::CaCompromise => 2,
            CrlReason::AffiliationChanged => 3,
            CrlReason::Superseded => 4,
            CrlReason::CessationOfOperation => 5,
            CrlReason::CertificateHold => 6,
            CrlReason::RemoveFromCrl => 8,
            CrlReason::PrivilegeWithdrawn => 9,
            CrlReason::AaCompromise => 10,
        }
    }

    /// Returns the ASN.1 name from RFC 5280, for example "keyCompromise".
    pub fn name(self) -> &'static str {
        match self {
            CrlReason::Unspecified => "unspecified",
            CrlReason::KeyCompromise => "keyCompromise",
            CrlReason::CaCompromise => "cACompromise",
            CrlReason::AffiliationChanged => "affiliationChanged",
            CrlReason::Superseded => "superseded",
            CrlReason::CessationOfOperation => "cessationOfOperation",
            CrlReason::CertificateHold => "certificateHold",
            CrlReason::RemoveFromCrl => "removeFromCRL",
            CrlReason::PrivilegeWithdrawn => "privilegeWithdrawn",
            CrlReason::AaCompromise => "aACompromise",
        }
    }
}

impl fmt::Display for CrlReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One revoked certificate as stored in the index.
///
/// The fields are byte arrays so that the struct has an alignment of 1 and a
/// map slot takes 30 bytes instead of 40, which is 20 MiB less for a
/// million entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedEntry {
    revoked_at: [u8; 8],
    reason: u8,
}

impl RevokedEntry {
    pub(super) fn new(revoked_at_unix: i64, reason: Option<CrlReason>) -> RevokedEntry {
        RevokedEntry {
            revoked_at: revoked_at_unix.to_le_bytes(),
            reason: reason.map_or(NO_REASON, CrlReason::code),
        }
    }

    /// Returns the revocationDate in seconds since the Unix epoch.
    pub fn revoked_at_unix(&self) -> i64 {
        i64::from_le_bytes(self.revoked_at)
    }

    /// Returns the reasonCode entry extension, when present.
    pub fn reason(&self) -> Option<CrlReason> {
        CrlReason::from_code(self.reason)
    }
}

/// The revoked serial numbers of one CRL.
///
/// Keys are the content octets of the DER INTEGER with redundant leading
/// 0x00 and 0xff octets removed, which is one encoding per value. The hex form
/// of a key is what [`DeviceIdentity::serial_hex`](super::DeviceIdentity)
/// holds, see [`serial_bytes_from_hex`].
#[derive(Debug, Default)]
pub struct RevokedSerials {
    inline: HashMap<InlineSerial, RevokedEntry>,
    long: HashMap<Box<[u8]>, RevokedEntry>,
}

impl RevokedSerials {
    pub(super) fn with_capacity(capacity: usize) -> RevokedSerials {
        RevokedSerials {
            inline: HashMap::with_capacity(capacity),
            long: HashMap::new(),
        }
    }

    /// Inserts an entry. A serial listed twice keeps its first entry.
    pub(super) fn insert(&mut self, serial: &[u8], entry: RevokedEntry) {
        let serial = canonical_integer(serial);
        match inline_serial(serial) {
            Some(key) => {
                self.inline.entry(key).or_insert(entry);
            }
            None => {
                self.long.entry(serial.into()).or_insert(entry);
            }
        }
    }

    /// Looks up a serial number given as the content octets of its DER
    /// INTEGER, as in a certificate.
    pub fn get(&self, serial: &[u8]) -> Option<RevokedEntry> {
        let serial = canonical_integer(serial);
        match inline_serial(serial) {
            Some(key) => self.inline.get(&key).copied(),
            None => self.long.get(serial).copied(),
        }
    }

    pub fn len(&self) -> usize {
        self.inline.len() + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the leading octets that a minimal two's complement encoding would
/// not have: 0x00 before an octet below 0x80, and 0xff before one from 0x80.
pub(super) fn canonical_integer(mut bytes: &[u8]) -> &[u8] {
    while let [first, second, ..] = bytes {
        let redundant =
            (*first == 0x00 && *second & 0x80 == 0) || (*first == 0xff && *second & 0x80 != 0);
        if !redundant {
            break;
        }
        bytes = &bytes[1..];
    }
    bytes
}

fn inline_serial(canonical: &[u8]) -> Option<InlineSerial> {
    if canonical.len() > INLINE_SERIAL_LEN {
        return None;
    }
    let mut key = [0u8; INLINE_SERIAL_LEN + 1];
    // The length fits in a u8 because it is at most INLINE_SERIAL_LEN.
    key[0] = canonical.len() as u8;
    key[1..=canonical.len()].copy_from_slice(canonical);
    Some(key)
}

/// Converts a serial number in the `serial_hex` form ("1000", "00", "-05")
/// into the content octets of its minimal DER INTEGER.
///
/// Upper-case digits, leading zero digits and an odd number of digits are
/// accepted, so "0X1000" is rejected but "01000" and "ABC" are not.
///
/// # Errors
///
/// Returns a message when `hex` is empty or has a character that is not a
/// hex digit after the optional '-'.
pub fn serial_bytes_from_hex(hex: &str) -> Result<Vec<u8>, String> {
    let (negative, digits) = match hex.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, hex),
    };
    if digits.is_empty() {
        return Err(format!("serial number {hex:?} has no hex digits"));
    }
    if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "serial number {hex:?} contains {c:?}, but only hex digits and a leading '-' are allowed"
        ));
    }

    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_owned()
    };
    let mut magnitude = Vec::with_capacity(padded.len() / 2 + 1);
    for pair in padded.as_bytes().chunks(2) {
        let text = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
        let byte = u8::from_str_radix(text, 16).map_err(|e| e.to_string())?;
        magnitude.push(byte);
    }

    let start = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len());
    let magnitude = &magnitude[start..];
    if magnitude.is_empty() {
        return Ok(vec![0]);
    }
    let mut positive = Vec::with_capacity(magnitude.len() + 1);
    if magnitude[0] & 0x80 != 0 {
        positive.push(0);
    }
    positive.extend_from_slice(magnitude);
    if !negative {
        return Ok(positive);
    }

    let mut negated: Vec<u8> = positive.iter().map(|b| !b).collect();
    for byte in negated.iter_mut().rev() {
        let (sum, overflow) = byte.overflowing_add(1);
        *byte = sum;
        if !overflow {
            break;
        }
    }
    Ok(canonical_integer(&negated).to_vec())
}

/// Compares two non-negative minimal two's complement integers.
pub(super) fn compare_unsigned(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let a = canonical_integer(a);
    let b = canonical_integer(b);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}
