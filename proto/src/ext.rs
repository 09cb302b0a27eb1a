//! NTP extension fields (RFC 7822) as zero-copy views over `&[u8]`.
//!
//! On the wire a field is a 16-bit type, a 16-bit length counting the whole
//! field (header included), and a value padded with zeros to a multiple of 4
//! bytes. RFC 7822 requires at least 16 bytes per field.

/// The smallest extension field RFC 7822 allows.
pub const MIN_FIELD_LEN: usize = 16;

/// Extension field types chime knows (IANA "NTP Extension Field Types").
pub mod field_type {
    /// NTS Unique Identifier (RFC 8915).
    pub const UNIQUE_IDENTIFIER: u16 = 0x0104;
    /// NTS Cookie (RFC 8915).
    pub const NTS_COOKIE: u16 = 0x0204;
    /// NTS Cookie Placeholder (RFC 8915).
    pub const NTS_COOKIE_PLACEHOLDER: u16 = 0x0304;
    /// NTS Authenticator and Encrypted Extension Fields (RFC 8915).
    pub const NTS_AUTHENTICATOR: u16 = 0x0404;
}

/// One extension field, borrowed from the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtensionField<'a> {
    /// The field type.
    pub field_type: u16,
    /// The value, padding included (the length field does not say how much
    /// of the tail is padding; each field type knows its own layout).
    pub value: &'a [u8],
}

impl ExtensionField<'_> {
    /// Bytes the field occupies on the wire, header included.
    pub fn wire_len(&self) -> usize {
        self.value.len() + 4
    }
}

/// Why the bytes after the NTP header are not valid extension fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtensionError {
    /// Fewer than 4 bytes left: no room for a field header.
    #[error("truncated extension field header")]
    TruncatedHeader,
    /// The length field is below 16 or not a multiple of 4.
    #[error("extension field length {0} is invalid")]
    BadLength(u16),
    /// The length field runs past the end of the packet.
    #[error("extension field length {0} exceeds the packet")]
    Overrun(u16),
}

/// Iterator over the extension fields in a byte slice; it stops after the
/// first error.
#[derive(Clone, Debug)]
pub struct ExtensionFields<'a> {
    rest: &'a [u8],
}

impl<'a> ExtensionFields<'a> {
    /// Iterates the fields in `bytes` (everything after the 48-byte header).
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for ExtensionFields<'a> {
    type Item = Result<ExtensionField<'a>, ExtensionError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = self.rest;
        if rest.len() < 4 {
            self.rest = &[];
            return Some(Err(ExtensionError::TruncatedHeader));
        }
        let field_type = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]);
        let ulen = usize::from(len);
        if ulen < MIN_FIELD_LEN || ulen % 4 != 0 {
            self.rest = &[];
            return Some(Err(ExtensionError::BadLength(len)));
        }
        if ulen > rest.len() {
            self.rest = &[];
            return Some(Err(ExtensionError::Overrun(len)));
        }
        self.rest = &rest[ulen..];
        Some(Ok(ExtensionField { field_type, value: &rest[4..ulen] }))
    }
}

/// Not enough room in the output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no room for the extension field in the output buffer")]
pub struct NoRoom;

/// Bytes a field with a `value_len`-byte value takes on the wire: header,
/// value, zero padding to a multiple of 4, and at least [`MIN_FIELD_LEN`].
pub const fn field_wire_len(value_len: usize) -> usize {
    let padded = (4 + value_len + 3) & !3;
    if padded < MIN_FIELD_LEN { MIN_FIELD_LEN } else { padded }
}

/// Writes one extension field at the start of `out`; returns its length.
pub fn write_extension_field(out: &mut [u8], field_type: u16, value: &[u8]) -> Result<usize, NoRoom> {
    let len = field_wire_len(value.len());
    let wire_len = u16::try_from(len).map_err(|_| NoRoom)?;
    let field = out.get_mut(..len).ok_or(NoRoom)?;
    field[..2].copy_from_slice(&field_type.to_be_bytes());
    field[2..4].copy_from_slice(&wire_len.to_be_bytes());
    field[4..4 + value.len()].copy_from_slice(value);
    field[4 + value.len()..].fill(0);
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_len_pads_and_has_minimum() {
        assert_eq!(field_wire_len(0), 16);
        assert_eq!(field_wire_len(12), 16);
        assert_eq!(field_wire_len(13), 20);
        assert_eq!(field_wire_len(32), 36);
    }

    #[test]
    fn errors() {
        assert_eq!(ExtensionFields::new(&[1, 2]).next(), Some(Err(ExtensionError::TruncatedHeader)));
        assert_eq!(ExtensionFields::new(&[0, 1, 0, 8, 0, 0, 0, 0]).next(), Some(Err(ExtensionError::BadLength(8))));
        assert_eq!(ExtensionFields::new(&[0, 1, 0, 18, 0, 0]).next(), Some(Err(ExtensionError::BadLength(18))));
        assert_eq!(ExtensionFields::new(&[0, 1, 0, 20, 0, 0, 0, 0]).next(), Some(Err(ExtensionError::Overrun(20))));
    }

    #[test]
    fn iterator_stops_after_error() {
        let mut it = ExtensionFields::new(&[0, 1, 0, 3, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert!(matches!(it.next(), Some(Err(_))));
        assert_eq!(it.next(), None);
    }

    #[test]
    fn no_room() {
        let mut out = [0u8; 15];
        assert_eq!(write_extension_field(&mut out, 1, &[]), Err(NoRoom));
    }
}
