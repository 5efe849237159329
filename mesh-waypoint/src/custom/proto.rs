//! The few protobuf wire-format pieces the `ext_authz` gRPC check needs: a writer for
//! the `CheckRequest` and a reader for the `CheckResponse`. Hand-written rather than
//! generated, because the two messages use a handful of fields and a codegen step (and
//! its dependency tree) would cost more than these functions.
use bytes::{BufMut, Bytes, BytesMut};

/// Wire type of a varint field.
const VARINT: u32 = 0;
/// Wire type of a fixed 64-bit field.
const FIXED64: u32 = 1;
/// Wire type of a length-delimited field (strings, bytes, messages).
const LEN: u32 = 2;
/// Wire type of a fixed 32-bit field.
const FIXED32: u32 = 5;

/// Appends fields to a message being encoded.
#[derive(Default)]
pub struct Writer {
    buf: BytesMut,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.put_u8(v as u8);
    }

    fn key(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    /// A varint field; a zero is skipped, as proto3 does for defaults.
    pub fn uint(&mut self, field: u32, v: u64) -> &mut Self {
        if v != 0 {
            self.key(field, VARINT);
            self.varint(v);
        }
        self
    }

    /// A string or bytes field; an empty one is skipped (proto3 default).
    pub fn bytes(&mut self, field: u32, bytes: &[u8]) -> &mut Self {
        if !bytes.is_empty() {
            self.key(field, LEN);
            self.varint(bytes.len() as u64);
            self.buf.put_slice(bytes);
        }
        self
    }

    pub fn string(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }

    /// An embedded message, written even when empty (its presence can matter).
    pub fn message(&mut self, field: u32, encode: impl FnOnce(&mut Writer)) -> &mut Self {
        let mut inner = Writer::new();
        encode(&mut inner);
        self.key(field, LEN);
        self.varint(inner.buf.len() as u64);
        self.buf.put_slice(&inner.buf);
        self
    }

    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// One field's value as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Len(&'a [u8]),
    Fixed32(u32),
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("protobuf message truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("protobuf varint too long at byte {offset}")]
    VarintOverflow { offset: usize },
    #[error("protobuf wire type {wire} of field {field} is not supported")]
    WireType { field: u32, wire: u32 },
    #[error("protobuf field number 0 at byte {offset}")]
    FieldZero { offset: usize },
}

/// Iterates over the fields of one message: `(field number, value)`; unknown fields
/// are for the caller to skip.
pub struct Reader<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, offset: 0 }
    }

    fn varint(&mut self) -> Result<u64, ProtoError> {
        let start = self.offset;
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.data.get(self.offset) else {
                return Err(ProtoError::Truncated { offset: self.offset });
            };
            self.offset += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::VarintOverflow { offset: start })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.offset.checked_add(n).filter(|end| *end <= self.data.len());
        let Some(end) = end else {
            return Err(ProtoError::Truncated { offset: self.offset });
        };
        let slice = &self.data[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn field(&mut self) -> Result<(u32, Value<'a>), ProtoError> {
        let at = self.offset;
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        let wire = (key & 7) as u32;
        if field == 0 {
            return Err(ProtoError::FieldZero { offset: at });
        }
        let value = match wire {
            VARINT => Value::Varint(self.varint()?),
            FIXED64 => Value::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            LEN => {
                let len = usize::try_from(self.varint()?).map_err(|_| ProtoError::Truncated { offset: at })?;
                Value::Len(self.take(len)?)
            }
            FIXED32 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            _ => return Err(ProtoError::WireType { field, wire }),
        };
        Ok((field, value))
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u32, Value<'a>), ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.data.len() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            // Stop after the first error: the rest cannot be framed.
            self.offset = self.data.len();
        }
        Some(item)
    }
}
