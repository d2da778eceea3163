//! Internet checksum arithmetic (RFC 1071) and incremental updates
//! (RFC 1624).
//!
//! The data path never recomputes a checksum over a whole packet: every
//! rewrite goes through [`write_tracked`], which records how the 16-bit words
//! under the written bytes changed, and the resulting [`Delta`] is folded
//! into each checksum that covers those bytes with RFC 1624 equation 3,
//! `HC' = ~(~HC + ~m + m')`. Full sums ([`sum`], [`finish`]) are only used to
//! build the ICMP messages this module generates.

/// One's-complement fold of a 32-bit accumulator into 16 bits (end-around
/// carry).
#[inline]
fn fold(mut sum: u32) -> u32 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The change to a one's-complement sum caused by rewriting some 16-bit
/// words: the sum of `~old + new` over every changed word (RFC 1624).
///
/// Kept folded to 16 bits, so adding never overflows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta(u32);

impl Delta {
    /// No change.
    pub(crate) const ZERO: Delta = Delta(0);

    /// Records that one 16-bit word went from `old` to `new`.
    #[inline]
    pub(crate) fn word(&mut self, old: u16, new: u16) {
        self.0 = fold(self.0 + u32::from(!old) + u32::from(new));
    }

    /// Adds another delta (both sets of changes are covered by the same
    /// checksum).
    #[inline]
    pub(crate) fn add(&mut self, other: Delta) {
        self.0 = fold(self.0 + other.0);
    }

    /// Applies the change to a checksum field: RFC 1624 eqn. 3,
    /// `HC' = ~(~HC + ~m + m')`.
    ///
    /// Unlike eqn. 2 this never turns a correct checksum into `0xffff`
    /// (negative zero) unless the covered data is all zeros, so it agrees
    /// bit for bit with a full recomputation.
    #[inline]
    pub(crate) fn apply(self, checksum: u16) -> u16 {
        // `fold` returns at most 0xffff, so the cast is lossless.
        !(fold(u32::from(!checksum) + self.0) as u16)
    }

    /// Like [`Delta::apply`] for a UDP checksum, where a computed zero is
    /// transmitted as `0xffff` (RFC 768; zero means "no checksum").
    #[inline]
    pub(crate) fn apply_udp(self, checksum: u16) -> u16 {
        match self.apply(checksum) {
            0 => 0xffff,
            c => c,
        }
    }
}

/// Reads the 16-bit word starting at `i`, padding with a zero byte past the
/// end of `buf` (as the checksum does for an odd-length region).
#[inline]
fn word_at(buf: &[u8], i: usize) -> u16 {
    let hi = buf.get(i).copied().unwrap_or(0);
    let lo = buf.get(i + 1).copied().unwrap_or(0);
    u16::from_be_bytes([hi, lo])
}

/// Writes `new` at `buf[at..]` and returns the change this makes to a
/// one's-complement sum whose 16-bit words are aligned on `base` (the start
/// of the checksummed region inside `buf`).
///
/// Works for writes at odd offsets (a TCP option can start anywhere). `buf`
/// must end where the checksummed region ends (a trailing odd byte is
/// paired with a zero pad, as in the checksum). Returns `None`, writing
/// nothing, when the write would not fit or starts before `base`.
pub(crate) fn write_tracked(buf: &mut [u8], base: usize, at: usize, new: &[u8]) -> Option<Delta> {
    let end = at.checked_add(new.len())?;
    if end > buf.len() || at < base {
        return None;
    }
    let start = at - ((at - base) & 1);
    let mut delta = 0u32;
    let mut i = start;
    while i < end {
        delta = fold(delta + u32::from(!word_at(buf, i)));
        i += 2;
    }
    buf.get_mut(at..end)?.copy_from_slice(new);
    let mut i = start;
    while i < end {
        delta = fold(delta + u32::from(word_at(buf, i)));
        i += 2;
    }
    Some(Delta(delta))
}

/// Reads the big-endian `u16` at `buf[at..at + 2]`.
#[inline]
pub(crate) fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Writes the big-endian `u16` at `buf[at..at + 2]`; does nothing if it does
/// not fit.
#[inline]
pub(crate) fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    if let Some(bytes) = at.checked_add(2).and_then(|end| buf.get_mut(at..end)) {
        bytes.copy_from_slice(&value.to_be_bytes());
    }
}

/// Applies `delta` to the checksum field at `buf[at..at + 2]`; `udp` selects
/// the UDP rule (a stored zero means "no checksum" and stays zero; a computed
/// zero is written as `0xffff`). Returns the change made to the field itself
/// (for a checksum that covers this field, e.g. an ICMP error's quote), or
/// `None` if the field is not in `buf`.
pub(crate) fn adjust(buf: &mut [u8], at: usize, delta: Delta, udp: bool) -> Option<Delta> {
    let old = read_u16(buf, at)?;
    let new = if udp {
        if old == 0 {
            return Some(Delta::ZERO);
        }
        delta.apply_udp(old)
    } else {
        delta.apply(old)
    };
    write_u16(buf, at, new);
    let mut change = Delta::ZERO;
    change.word(old, new);
    Some(change)
}

/// Adds `data` to a one's-complement running sum (odd trailing byte padded
/// with zero). The result is folded to 16 bits.
pub(crate) fn sum(initial: u32, data: &[u8]) -> u32 {
    let mut acc = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // Folded to at most 0xffff above.
    acc as u32
}

/// Turns a running sum into the checksum field value.
#[inline]
pub(crate) fn finish(sum: u32) -> u16 {
    !(fold(sum) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive full checksum for the tests of this file only.
    fn naive(data: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for (i, b) in data.iter().enumerate() {
            s += if i % 2 == 0 {
                u64::from(*b) << 8
            } else {
                u64::from(*b)
            };
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn incremental_matches_full_recompute_at_any_alignment() {
        let mut buf: Vec<u8> = (0u8..41).map(|b| b.wrapping_mul(37)).collect();
        for at in 0..buf.len() - 2 {
            let before = naive(&buf);
            let d = write_tracked(&mut buf, 0, at, &[0xab, 0xcd]).unwrap();
            assert_eq!(d.apply(before), naive(&buf), "at {at}");
        }
    }

    #[test]
    fn negative_zero_cases() {
        // Checksum 0x0000 is canonical for data summing to 0xffff.
        let mut buf = [0x12, 0x34, 0, 0];
        let before = naive(&buf);
        let d = write_tracked(&mut buf, 0, 2, &[0xed, 0xcb]).unwrap();
        // 0x1234 + 0xedcb = 0xffff: full recompute gives 0.
        assert_eq!(naive(&buf), 0);
        assert_eq!(d.apply(before), 0);
        assert_eq!(d.apply_udp(before), 0xffff);
        assert_eq!(Delta::ZERO.apply(0xffff), 0xffff);
        assert_eq!(Delta::ZERO.apply(0), 0);
    }

    #[test]
    fn out_of_bounds_write_is_refused() {
        let mut buf = [0u8; 4];
        assert_eq!(write_tracked(&mut buf, 0, 3, &[1, 2]), None);
        assert_eq!(write_tracked(&mut buf, 2, 1, &[1]), None);
        assert_eq!(write_tracked(&mut buf, 0, usize::MAX, &[1]), None);
        assert_eq!(buf, [0; 4]);
        assert_eq!(adjust(&mut buf, 3, Delta::ZERO, false), None);
    }

    #[test]
    fn full_sum() {
        let data = [0x45, 0x00, 0x00, 0x1c, 0x12];
        assert_eq!(finish(sum(0, &data)), naive(&data));
    }
}
