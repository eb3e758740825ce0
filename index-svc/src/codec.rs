//! Little-endian binary encoding shared by the write-ahead log and the
//! snapshot.
//!
//! Integers are fixed-width little-endian. A string or byte string is a `u32`
//! byte length followed by the bytes. A vector is `dimension` `f32` values
//! with no length prefix, because every container states its dimension once.

use crate::error::DecodeError;

/// Appends `value` to `buffer`.
pub(crate) fn put_u8(buffer: &mut Vec<u8>, value: u8) {
    buffer.push(value);
}

/// Appends `value` to `buffer`, little-endian.
pub(crate) fn put_u32(buffer: &mut Vec<u8>, value: u32) {
    buffer.extend_from_slice(&value.to_le_bytes());
}

/// Appends `value` to `buffer`, little-endian.
pub(crate) fn put_u64(buffer: &mut Vec<u8>, value: u64) {
    buffer.extend_from_slice(&value.to_le_bytes());
}

/// Appends a length-prefixed byte string.
///
/// Callers bound every field far below 4 GiB (request size limits), so the
/// length always fits the `u32` prefix.
pub(crate) fn put_bytes(buffer: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(u32::try_from(bytes.len()).is_ok());
    put_u32(buffer, bytes.len() as u32);
    buffer.extend_from_slice(bytes);
}

/// Appends a length-prefixed UTF-8 string.
pub(crate) fn put_str(buffer: &mut Vec<u8>, text: &str) {
    put_bytes(buffer, text.as_bytes());
}

/// Appends `values` without a length prefix.
pub(crate) fn put_f32s(buffer: &mut Vec<u8>, values: &[f32]) {
    buffer.reserve(values.len() * 4);
    for value in values {
        buffer.extend_from_slice(&value.to_le_bytes());
    }
}

/// Reads fields from a byte slice, checking every length against the bytes
/// left so that damaged input yields an error, never a panic or a huge
/// allocation.
pub(crate) struct Decoder<'a> {
    data: &'a [u8],
    position: usize,
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, position: 0 }
    }

    fn take(&mut self, needed: usize) -> Result<&'a [u8], DecodeError> {
        let remaining = self.data.len() - self.position;
        if needed > remaining {
            return Err(DecodeError::UnexpectedEnd {
                position: self.position,
                needed,
                remaining,
            });
        }
        let slice = &self.data[self.position..self.position + needed];
        self.position += needed;
        Ok(slice)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take_array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take_array()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let position = self.position;
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { position })
    }

    pub(crate) fn f32s(&mut self, count: usize) -> Result<Vec<f32>, DecodeError> {
        let needed = count.checked_mul(4).ok_or(DecodeError::InvalidField {
            field: "vector length",
            value: count.to_string(),
        })?;
        let bytes = self.take(needed)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect())
    }

    /// Reads a count of entries that each take at least `min_entry_bytes`,
    /// rejecting counts the remaining bytes cannot hold before anything is
    /// allocated for them.
    pub(crate) fn count(
        &mut self,
        field: &'static str,
        min_entry_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        let remaining = self.data.len() - self.position;
        if count.saturating_mul(min_entry_bytes.max(1)) > remaining {
            return Err(DecodeError::InvalidField {
                field,
                value: format!("{count} entries in {remaining} bytes"),
            });
        }
        Ok(count)
    }

    /// Fails when bytes remain after the last field.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        let extra = self.data.len() - self.position;
        if extra == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { extra })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut buffer = Vec::new();
        put_u8(&mut buffer, 7);
        put_u32(&mut buffer, 0xDEAD_BEEF);
        put_u64(&mut buffer, u64::MAX - 1);
        put_str(&mut buffer, "héllo");
        put_bytes(&mut buffer, &[1, 2, 3]);
        put_f32s(&mut buffer, &[1.5, -0.25]);

        let mut decoder = Decoder::new(&buffer);
        assert_eq!(decoder.u8().unwrap(), 7);
        assert_eq!(decoder.u32().unwrap(), 0xDEAD_BEEF);
        assert_eq!(decoder.u64().unwrap(), u64::MAX - 1);
        assert_eq!(decoder.string().unwrap(), "héllo");
        assert_eq!(decoder.bytes().unwrap(), &[1, 2, 3]);
        assert_eq!(decoder.f32s(2).unwrap(), vec![1.5, -0.25]);
        decoder.finish().unwrap();
    }

    #[test]
    fn short_input_is_an_error() {
        let mut buffer = Vec::new();
        put_u32(&mut buffer, 100);
        buffer.extend_from_slice(b"abc");

        let error = Decoder::new(&buffer).string().unwrap_err();

        assert_eq!(
            error,
            DecodeError::UnexpectedEnd {
                position: 4,
                needed: 100,
                remaining: 3
            }
        );
    }

    #[test]
    fn oversized_count_is_an_error() {
        let mut buffer = Vec::new();
        put_u32(&mut buffer, u32::MAX);

        let error = Decoder::new(&buffer).count("items", 4).unwrap_err();

        assert!(matches!(
            error,
            DecodeError::InvalidField { field: "items", .. }
        ));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut buffer = Vec::new();
        put_bytes(&mut buffer, &[0xFF, 0xFE]);

        assert_eq!(
            Decoder::new(&buffer).string().unwrap_err(),
            DecodeError::InvalidUtf8 { position: 0 }
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let decoder = Decoder::new(&[1, 2]);

        assert_eq!(
            decoder.finish().unwrap_err(),
            DecodeError::TrailingBytes { extra: 2 }
        );
    }
}
