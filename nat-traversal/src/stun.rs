//! STUN Binding codec (RFC 8489), without I/O.
//!
//! Only what Causeway needs on its WireGuard socket: Binding requests (to learn
//! the server-reflexive address of that socket), Binding success responses
//! (to answer them, on the rendezvous) and Binding error responses. No
//! authentication (a Binding request needs none), no TURN.
//!
//! The same UDP socket carries WireGuard, STUN and Causeway path probes;
//! [`is_stun`] is the cheap demultiplexing test. It never claims a WireGuard
//! message (first byte 1..=4 then three zero bytes, never 20 bytes long) nor a
//! Causeway probe (first byte >= 0x80).
//!
//! Messages we encode carry a FINGERPRINT attribute (RFC 8489 §14.7), as
//! recommended when STUN shares a socket with another protocol; plain
//! RFC 8489 servers such as coturn accept it. [`parse`] validates FINGERPRINT
//! when present but does not require it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rand::RngCore;

/// The fixed value at bytes 4..8 of every RFC 5389/8489 STUN message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;

/// Length of an encoded Binding request ([`encode_binding_request`]).
pub const BINDING_REQUEST_LEN: usize = HEADER_LEN + FINGERPRINT_ATTR_LEN;

/// Largest output of any encoder in this module: a Binding success with an
/// IPv6 XOR-MAPPED-ADDRESS and FINGERPRINT (64 bytes is plenty for any of them).
pub const MAX_ENCODED_LEN: usize = HEADER_LEN + 4 + 20 + FINGERPRINT_ATTR_LEN;

/// The Binding method.
pub const METHOD_BINDING: u16 = 0x001;

const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const ATTR_PASSWORD_ALGORITHM: u16 = 0x001D;
const ATTR_USERHASH: u16 = 0x001E;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_PRIORITY: u16 = 0x0024;
const ATTR_USE_CANDIDATE: u16 = 0x0025;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_PADDING: u16 = 0x0026;
const ATTR_RESPONSE_PORT: u16 = 0x0027;
const ATTR_FINGERPRINT: u16 = 0x8028;

const FINGERPRINT_XOR: u32 = 0x5354_554E;
const FINGERPRINT_ATTR_LEN: usize = 8;

/// Comprehension-required attributes (0x0000..=0x7FFF) that a Binding message
/// may carry and that we understand or may safely ignore (authentication, ICE
/// and RFC 5780 attributes: we answer without them). Any other
/// comprehension-required attribute makes [`parse`] fail, as RFC 8489 §6.3
/// requires.
const KNOWN_REQUIRED: &[u16] = &[
    ATTR_MAPPED_ADDRESS,
    ATTR_CHANGE_REQUEST,
    ATTR_USERNAME,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_ERROR_CODE,
    ATTR_UNKNOWN_ATTRIBUTES,
    ATTR_REALM,
    ATTR_NONCE,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_PASSWORD_ALGORITHM,
    ATTR_USERHASH,
    ATTR_XOR_MAPPED_ADDRESS,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
    ATTR_PADDING,
    ATTR_RESPONSE_PORT,
];

/// A 96-bit STUN transaction id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// A fresh transaction id from the caller's random number generator
    /// (RFC 8489 asks for a cryptographically random one).
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut id = [0; 12];
        rng.fill_bytes(&mut id);
        Self(id)
    }
}

impl std::fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransactionId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// The class of a STUN message (RFC 8489 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request.
    Request,
    /// An indication (no response expected).
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

/// A parsed STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StunMessage {
    /// A Binding request: answer it with the source address it came from.
    BindingRequest {
        /// Transaction id to echo in the response.
        tx: TransactionId,
    },
    /// A Binding success response.
    BindingSuccess {
        /// Transaction id of the request it answers.
        tx: TransactionId,
        /// The reflexive transport address the server saw (XOR-MAPPED-ADDRESS,
        /// or legacy MAPPED-ADDRESS when that is all there is).
        mapped: SocketAddr,
    },
    /// A Binding error response.
    BindingError {
        /// Transaction id of the request it answers.
        tx: TransactionId,
        /// The error code (300..=699), e.g. 400 Bad Request.
        code: u16,
    },
    /// Any other well-formed STUN message (another method, or a Binding
    /// indication); its attributes are not interpreted.
    Other {
        /// Its class.
        class: Class,
        /// Its method (12 bits).
        method: u16,
        /// Its transaction id.
        tx: TransactionId,
    },
}

impl StunMessage {
    /// The transaction id of the message.
    pub fn tx(&self) -> TransactionId {
        match *self {
            StunMessage::BindingRequest { tx }
            | StunMessage::BindingSuccess { tx, .. }
            | StunMessage::BindingError { tx, .. }
            | StunMessage::Other { tx, .. } => tx,
        }
    }
}

/// Why a datagram is not an acceptable STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Not a STUN message at all (too short, wrong first bits, no magic cookie,
    /// or a length field that disagrees with the datagram).
    #[error("not a STUN message")]
    NotStun,
    /// An attribute header or value runs past the end of the message.
    #[error("truncated STUN attribute")]
    Truncated,
    /// The FINGERPRINT attribute does not match the message, or is not last.
    #[error("bad STUN FINGERPRINT")]
    BadFingerprint,
    /// An address attribute is malformed (bad length or address family).
    #[error("malformed STUN address attribute {attr:#06x}")]
    BadAddress {
        /// The attribute type.
        attr: u16,
    },
    /// An ERROR-CODE attribute is malformed.
    #[error("malformed STUN ERROR-CODE attribute")]
    BadErrorCode,
    /// A Binding message carries a comprehension-required attribute we do not
    /// understand; a server should answer 420 (Unknown Attribute) with `tx`.
    #[error("unknown comprehension-required STUN attribute {attr:#06x}")]
    UnknownAttribute {
        /// Transaction id of the message, to answer it.
        tx: TransactionId,
        /// The attribute type.
        attr: u16,
    },
    /// A Binding success response without any mapped address.
    #[error("STUN Binding success response without a mapped address")]
    MissingMappedAddress,
    /// A Binding error response without an ERROR-CODE attribute.
    #[error("STUN Binding error response without an ERROR-CODE")]
    MissingErrorCode,
}

/// Whether `datagram` looks like an RFC 5389/8489 STUN message: first two bits
/// zero, the magic cookie at bytes 4..8, and a length field (a multiple of 4)
/// that accounts for exactly the rest of the datagram.
///
/// This is the demultiplexing test for the shared WireGuard socket. It is
/// false for every WireGuard message (type 1..=4 followed by three zero bytes:
/// the length field would be 0 but WireGuard messages are never 20 bytes) and
/// for every Causeway probe (first byte >= 0x80).
pub fn is_stun(datagram: &[u8]) -> bool {
    let Some(header) = datagram.first_chunk::<HEADER_LEN>() else {
        return false;
    };
    if header[0] & 0xC0 != 0 {
        return false;
    }
    // A WireGuard message type (explicit, although the length test below
    // already excludes every WireGuard message size).
    if (1..=4).contains(&header[0]) && header[1..4] == [0, 0, 0] {
        return false;
    }
    if u32::from_be_bytes([header[4], header[5], header[6], header[7]]) != MAGIC_COOKIE {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    len % 4 == 0 && HEADER_LEN + len == datagram.len()
}

/// Encodes a Binding request (header and FINGERPRINT, no other attribute)
/// into `out` and returns its length, [`BINDING_REQUEST_LEN`].
///
/// # Panics
/// If `out` is shorter than [`BINDING_REQUEST_LEN`].
pub fn encode_binding_request(tx: &TransactionId, out: &mut [u8]) -> usize {
    let w = Writer::new(out, message_type(Class::Request, METHOD_BINDING), tx);
    w.finish_with_fingerprint()
}

/// Encodes a Binding success response carrying `mapped` in an
/// XOR-MAPPED-ADDRESS attribute (plus FINGERPRINT) and returns its length
/// (40 bytes for IPv4, 52 for IPv6).
///
/// # Panics
/// If `out` is shorter than [`MAX_ENCODED_LEN`] (or the actual length).
pub fn encode_binding_success(tx: &TransactionId, mapped: SocketAddr, out: &mut [u8]) -> usize {
    let mut w = Writer::new(out, message_type(Class::Success, METHOD_BINDING), tx);
    let port = mapped.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match mapped.ip() {
        IpAddr::V4(ip) => {
            let x = u32::from(ip) ^ MAGIC_COOKIE;
            let mut value = [0u8; 8];
            value[1] = 0x01;
            value[2..4].copy_from_slice(&port.to_be_bytes());
            value[4..8].copy_from_slice(&x.to_be_bytes());
            w.attribute(ATTR_XOR_MAPPED_ADDRESS, &value);
        }
        IpAddr::V6(ip) => {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(&tx.0);
            let mut value = [0u8; 20];
            value[1] = 0x02;
            value[2..4].copy_from_slice(&port.to_be_bytes());
            for (i, b) in ip.octets().iter().enumerate() {
                value[4 + i] = b ^ mask[i];
            }
            w.attribute(ATTR_XOR_MAPPED_ADDRESS, &value);
        }
    }
    w.finish_with_fingerprint()
}

/// Encodes a Binding error response with ERROR-CODE `code` (300..=699, e.g.
/// 400 Bad Request or 420 Unknown Attribute; no reason phrase) plus
/// FINGERPRINT, and returns its length (36 bytes).
///
/// # Panics
/// If `out` is shorter than [`MAX_ENCODED_LEN`], or `code` is not in 300..=699.
pub fn encode_binding_error(tx: &TransactionId, code: u16, out: &mut [u8]) -> usize {
    assert!(
        (300..=699).contains(&code),
        "STUN error code out of range: {code}"
    );
    let mut w = Writer::new(out, message_type(Class::Error, METHOD_BINDING), tx);
    let class = u8::try_from(code / 100).unwrap_or(4);
    let number = u8::try_from(code % 100).unwrap_or(0);
    w.attribute(ATTR_ERROR_CODE, &[0, 0, class, number]);
    w.finish_with_fingerprint()
}

/// Parses a STUN message. Never panics, whatever the input.
///
/// Accepts XOR-MAPPED-ADDRESS and the legacy MAPPED-ADDRESS (IPv4 and IPv6),
/// skips comprehension-optional attributes it does not know, ignores
/// attributes after MESSAGE-INTEGRITY (other than FINGERPRINT), and validates
/// FINGERPRINT when present.
pub fn parse(datagram: &[u8]) -> Result<StunMessage, StunError> {
    if !is_stun(datagram) {
        return Err(StunError::NotStun);
    }
    let msg_type = u16::from_be_bytes([datagram[0], datagram[1]]);
    let (class, method) = split_type(msg_type);
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&datagram[8..20]);
    let tx = TransactionId(tx);

    let binding = method == METHOD_BINDING;
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut error_code = None;
    let mut after_integrity = false;
    let mut offset = HEADER_LEN;
    while offset < datagram.len() {
        let Some(attr_header) = datagram.get(offset..offset + 4) else {
            return Err(StunError::Truncated);
        };
        let attr = u16::from_be_bytes([attr_header[0], attr_header[1]]);
        let len = usize::from(u16::from_be_bytes([attr_header[2], attr_header[3]]));
        let value_start = offset + 4;
        let Some(value) = datagram.get(value_start..value_start + len) else {
            return Err(StunError::Truncated);
        };
        let next = value_start + len.next_multiple_of(4);
        if next > datagram.len() {
            return Err(StunError::Truncated);
        }

        if attr == ATTR_FINGERPRINT {
            if len != 4 || next != datagram.len() {
                return Err(StunError::BadFingerprint);
            }
            let expected = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            if crc32(&datagram[..offset]) ^ FINGERPRINT_XOR != expected {
                return Err(StunError::BadFingerprint);
            }
        } else if binding && !after_integrity {
            match attr {
                ATTR_XOR_MAPPED_ADDRESS => {
                    xor_mapped = Some(
                        parse_address(value, Some(&tx)).ok_or(StunError::BadAddress { attr })?,
                    );
                }
                ATTR_MAPPED_ADDRESS => {
                    mapped =
                        Some(parse_address(value, None).ok_or(StunError::BadAddress { attr })?);
                }
                ATTR_ERROR_CODE => {
                    let [_, _, class, number, ..] = *value else {
                        return Err(StunError::BadErrorCode);
                    };
                    let class = u16::from(class & 0x07);
                    let number = u16::from(number);
                    if !(3..=6).contains(&class) || number > 99 {
                        return Err(StunError::BadErrorCode);
                    }
                    error_code = Some(class * 100 + number);
                }
                ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 => after_integrity = true,
                a if a < 0x8000 && !KNOWN_REQUIRED.contains(&a) => {
                    return Err(StunError::UnknownAttribute { tx, attr });
                }
                _ => {}
            }
        }
        offset = next;
    }

    if !binding {
        return Ok(StunMessage::Other { class, method, tx });
    }
    match class {
        Class::Request => Ok(StunMessage::BindingRequest { tx }),
        Class::Success => {
            let mapped = xor_mapped
                .or(mapped)
                .ok_or(StunError::MissingMappedAddress)?;
            Ok(StunMessage::BindingSuccess { tx, mapped })
        }
        Class::Error => {
            let code = error_code.ok_or(StunError::MissingErrorCode)?;
            Ok(StunMessage::BindingError { tx, code })
        }
        Class::Indication => Ok(StunMessage::Other { class, method, tx }),
    }
}

/// Parses a (XOR-)MAPPED-ADDRESS value; `xor` carries the transaction id for
/// XOR-MAPPED-ADDRESS.
fn parse_address(value: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = *value.get(1)?;
    let mut port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match (family, value.len()) {
        (0x01, 8) => {
            let mut ip = u32::from_be_bytes([value[4], value[5], value[6], value[7]]);
            if xor.is_some() {
                ip ^= MAGIC_COOKIE;
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&value[4..20]);
            if let Some(tx) = xor {
                let mut mask = [0u8; 16];
                mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                mask[4..].copy_from_slice(&tx.0);
                for (o, m) in octets.iter_mut().zip(mask) {
                    *o ^= m;
                }
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => None,
    }
}

/// The 14-bit message type for a class and a 12-bit method (RFC 8489 §5).
fn message_type(class: Class, method: u16) -> u16 {
    let c: u16 = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

fn split_type(t: u16) -> (Class, u16) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 0b01) | ((t >> 7) & 0b10) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::Success,
        _ => Class::Error,
    };
    (class, method)
}

/// Writes a message into a caller buffer, fixing the length field up at the end.
struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut [u8], msg_type: u16, tx: &TransactionId) -> Self {
        out[0..2].copy_from_slice(&msg_type.to_be_bytes());
        out[2..4].copy_from_slice(&[0, 0]);
        out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out[8..20].copy_from_slice(&tx.0);
        Self {
            out,
            len: HEADER_LEN,
        }
    }

    fn attribute(&mut self, attr: u16, value: &[u8]) {
        let start = self.len;
        let padded = value.len().next_multiple_of(4);
        let Ok(value_len) = u16::try_from(value.len()) else {
            unreachable!("STUN attributes we write are tiny");
        };
        self.out[start..start + 2].copy_from_slice(&attr.to_be_bytes());
        self.out[start + 2..start + 4].copy_from_slice(&value_len.to_be_bytes());
        self.out[start + 4..start + 4 + value.len()].copy_from_slice(value);
        self.out[start + 4 + value.len()..start + 4 + padded].fill(0);
        self.len = start + 4 + padded;
        self.set_length(self.len);
    }

    fn set_length(&mut self, total: usize) {
        let body = u16::try_from(total - HEADER_LEN).unwrap_or(u16::MAX);
        self.out[2..4].copy_from_slice(&body.to_be_bytes());
    }

    /// Appends FINGERPRINT (its CRC covers the header with the final length).
    fn finish_with_fingerprint(mut self) -> usize {
        let start = self.len;
        self.set_length(start + FINGERPRINT_ATTR_LEN);
        let crc = crc32(&self.out[..start]) ^ FINGERPRINT_XOR;
        self.attribute(ATTR_FINGERPRINT, &crc.to_be_bytes());
        self.len
    }
}

/// CRC-32 (ISO/IEEE 802.3, the one FINGERPRINT uses).
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const RFC5769_TX: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.1: sample request (USERNAME, MESSAGE-INTEGRITY, ICE
    /// attributes, FINGERPRINT).
    const RFC5769_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    /// RFC 5769 §2.2: sample IPv4 response.
    const RFC5769_IPV4_RESPONSE: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 08 00 01 a1 47 e1 12 a6 43
        00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
        80 28 00 04 c0 7d 4c 96";

    /// RFC 5769 §2.3: sample IPv6 response.
    const RFC5769_IPV6_RESPONSE: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
        80 28 00 04 c8 fb 0b 4c";

    #[test]
    fn rfc5769_request() {
        let msg = unhex(RFC5769_REQUEST);
        assert!(is_stun(&msg));
        assert_eq!(
            parse(&msg),
            Ok(StunMessage::BindingRequest {
                tx: TransactionId(RFC5769_TX)
            })
        );
    }

    #[test]
    fn rfc5769_ipv4_response() {
        let msg = unhex(RFC5769_IPV4_RESPONSE);
        assert_eq!(
            parse(&msg),
            Ok(StunMessage::BindingSuccess {
                tx: TransactionId(RFC5769_TX),
                mapped: "192.0.2.1:32853".parse().unwrap(),
            })
        );
    }

    #[test]
    fn rfc5769_ipv6_response() {
        let msg = unhex(RFC5769_IPV6_RESPONSE);
        assert_eq!(
            parse(&msg),
            Ok(StunMessage::BindingSuccess {
                tx: TransactionId(RFC5769_TX),
                mapped: "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .unwrap(),
            })
        );
    }

    #[test]
    fn corrupted_fingerprint_is_rejected() {
        let mut msg = unhex(RFC5769_IPV4_RESPONSE);
        let last = msg.len() - 1;
        msg[last] ^= 1;
        assert_eq!(parse(&msg), Err(StunError::BadFingerprint));
        // A flipped bit in the body is caught by the fingerprint too.
        let mut msg = unhex(RFC5769_IPV4_RESPONSE);
        msg[30] ^= 0x10;
        assert_eq!(parse(&msg), Err(StunError::BadFingerprint));
    }

    #[test]
    fn binding_request_is_plain() {
        let tx = TransactionId([7; 12]);
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = encode_binding_request(&tx, &mut buf);
        assert_eq!(n, BINDING_REQUEST_LEN);
        // Type 0x0001, length 8 (FINGERPRINT only), cookie, tx.
        assert_eq!(&buf[..8], &[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(&buf[8..20], &[7; 12]);
        assert_eq!(&buf[20..24], &[0x80, 0x28, 0x00, 0x04]);
        assert!(is_stun(&buf[..n]));
        assert_eq!(parse(&buf[..n]), Ok(StunMessage::BindingRequest { tx }));
    }

    #[test]
    fn binding_success_roundtrip() {
        let tx = TransactionId(RFC5769_TX);
        for addr in [
            "192.0.2.1:32853",
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
            "0.0.0.0:0",
            "255.255.255.255:65535",
        ] {
            let mapped: SocketAddr = addr.parse().unwrap();
            let mut buf = [0u8; MAX_ENCODED_LEN];
            let n = encode_binding_success(&tx, mapped, &mut buf);
            assert_eq!(n, if mapped.is_ipv4() { 40 } else { 52 });
            assert_eq!(
                parse(&buf[..n]),
                Ok(StunMessage::BindingSuccess { tx, mapped })
            );
        }
        // Same XOR-MAPPED-ADDRESS bytes as the RFC 5769 vector.
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = encode_binding_success(&tx, "192.0.2.1:32853".parse().unwrap(), &mut buf);
        assert_eq!(
            &buf[20..32],
            &unhex("00 20 00 08 00 01 a1 47 e1 12 a6 43")[..]
        );
        assert!(n > 32);
    }

    #[test]
    fn binding_error_roundtrip() {
        let tx = TransactionId([1; 12]);
        let mut buf = [0u8; MAX_ENCODED_LEN];
        for code in [300, 400, 420, 487, 500, 699] {
            let n = encode_binding_error(&tx, code, &mut buf);
            assert_eq!(parse(&buf[..n]), Ok(StunMessage::BindingError { tx, code }));
        }
    }

    #[test]
    fn legacy_mapped_address() {
        // Binding success with MAPPED-ADDRESS only (RFC 3489 style, but with the cookie).
        let mut msg = unhex(
            "01 01 00 0c 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 01
             00 01 00 08 00 01 04 d2 c6 33 64 07",
        );
        assert_eq!(
            parse(&msg),
            Ok(StunMessage::BindingSuccess {
                tx: TransactionId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                mapped: "198.51.100.7:1234".parse().unwrap()
            })
        );
        // XOR-MAPPED-ADDRESS wins over MAPPED-ADDRESS when both are present.
        msg[3] = 0x18;
        msg.extend(unhex("00 20 00 08 00 01 a1 47 e1 12 a6 43"));
        let StunMessage::BindingSuccess { mapped, .. } = parse(&msg).unwrap() else {
            panic!()
        };
        assert_eq!(mapped, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn unknown_attributes() {
        // Unknown comprehension-optional (0x8123): skipped.
        let msg = unhex(
            "00 01 00 08 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 02 81 23 00 01 ff 00 00 00",
        );
        assert_eq!(
            parse(&msg),
            Ok(StunMessage::BindingRequest {
                tx: TransactionId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])
            })
        );
        // Unknown comprehension-required (0x0123): rejected, with the tx to answer 420.
        let msg = unhex(
            "00 01 00 08 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 02 01 23 00 01 ff 00 00 00",
        );
        assert_eq!(
            parse(&msg),
            Err(StunError::UnknownAttribute {
                tx: TransactionId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
                attr: 0x0123
            })
        );
        // Truncated attribute.
        let msg = unhex("00 01 00 04 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 02 81 23 00 08");
        assert_eq!(parse(&msg), Err(StunError::Truncated));
        // Other methods are not interpreted (an Allocate request).
        let msg = unhex(
            "00 03 00 08 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 02 01 23 00 01 ff 00 00 00",
        );
        assert_eq!(
            parse(&msg),
            Ok(StunMessage::Other {
                class: Class::Request,
                method: 3,
                tx: TransactionId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])
            })
        );
    }

    #[test]
    fn message_types() {
        for method in [1u16, 3, 0x7F, 0xFFF] {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let t = message_type(class, method);
                assert_eq!(t & 0xC000, 0);
                assert_eq!(split_type(t), (class, method));
            }
        }
        assert_eq!(message_type(Class::Success, METHOD_BINDING), 0x0101);
        assert_eq!(message_type(Class::Error, METHOD_BINDING), 0x0111);
        assert_eq!(message_type(Class::Indication, METHOD_BINDING), 0x0011);
    }

    #[test]
    fn wireguard_is_never_stun() {
        // Every WireGuard message type at every WireGuard size, with the
        // sender index equal to the magic cookie (the worst case).
        for ty in 1u8..=4 {
            for len in [20usize, 32, 64, 92, 148, 1500] {
                let mut msg = vec![0u8; len];
                msg[0] = ty;
                msg[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                assert!(!is_stun(&msg), "type {ty} len {len}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&data);
        }

        #[test]
        fn parse_never_panics_on_stun_like(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            ty in 0u16..0x4000,
        ) {
            let mut body = body;
            body.truncate(body.len() / 4 * 4);
            let mut msg = Vec::new();
            msg.extend_from_slice(&ty.to_be_bytes());
            msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
            msg.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            msg.extend_from_slice(&[9; 12]);
            msg.extend_from_slice(&body);
            let _ = parse(&msg);
        }

        #[test]
        fn success_roundtrip(
            ip in proptest::array::uniform16(proptest::num::u8::ANY),
            v4 in proptest::bool::ANY,
            port in proptest::num::u16::ANY,
            tx in proptest::array::uniform12(proptest::num::u8::ANY),
        ) {
            let ip = if v4 {
                IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(ip))
            };
            let mapped = SocketAddr::new(ip, port);
            let tx = TransactionId(tx);
            let mut buf = [0u8; MAX_ENCODED_LEN];
            let n = encode_binding_success(&tx, mapped, &mut buf);
            let expected = Ok(StunMessage::BindingSuccess { tx, mapped });
            proptest::prop_assert_eq!(parse(&buf[..n]), expected);
        }
    }
}
