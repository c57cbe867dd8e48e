//! A small tagged little-endian codec for state section bodies:
//! fields `tag u32 | length u32 | bytes | pad to 8`. Bit 31 of a tag marks the field optional:
//! a reader skips unknown optional fields and fails on unknown mandatory ones, so a new field is
//! a new optional tag and an incompatible change is a section version bump.
//!
//! Also the one place that views `#[repr(C)]` kvm-bindings structs as bytes.

/// Bit 31 of a tag: the field may be skipped by readers that do not know it.
pub const OPTIONAL_TAG: u32 = 1 << 31;

/// Errors of the codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateCodecError {
    #[error("state section truncated at byte {0}")]
    Truncated(usize),
    #[error("state field {tag:#x} is {got} bytes long, want {want}")]
    Length { tag: u32, want: usize, got: usize },
    #[error("state section lacks mandatory field {0:#x}")]
    Missing(u32),
    #[error("state section has unknown mandatory field {0:#x}")]
    Unknown(u32),
    #[error("state field {0:#x} appears twice")]
    Duplicate(u32),
    #[error("non-zero padding after state field {0:#x}")]
    Padding(u32),
    #[error("state section has more than {MAX_FIELDS} fields")]
    TooManyFields,
}

/// Most fields a section may have (the largest, a vCPU's, has a few dozen): a section of
/// millions of empty fields is refused before it costs more than this.
pub const MAX_FIELDS: usize = 4096;

/// Writes fields.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder::default()
    }
    pub fn field(&mut self, tag: u32, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&tag.to_le_bytes());
        self.buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(bytes);
        let pad = (8 - bytes.len() % 8) % 8;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    pub fn u64(&mut self, tag: u32, v: u64) -> &mut Self {
        self.field(tag, &v.to_le_bytes())
    }
    pub fn pod<T: Pod>(&mut self, tag: u32, v: &T) -> &mut Self {
        self.field(tag, pod_bytes(v))
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Reads fields; every field is read once, in any order.
#[derive(Debug)]
pub struct Decoder<'a> {
    fields: Vec<(u32, &'a [u8])>,
    used: Vec<bool>,
}

impl<'a> Decoder<'a> {
    /// Splits `b` into fields, checking every length against what is there.
    pub fn parse(b: &'a [u8]) -> Result<Self, StateCodecError> {
        let mut fields: Vec<(u32, &'a [u8])> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut o = 0usize;
        while o < b.len() {
            let h = b.get(o..o + 8).ok_or(StateCodecError::Truncated(o))?;
            let tag = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let start = o + 8;
            let end = start.checked_add(len).ok_or(StateCodecError::Truncated(o))?;
            let data = b.get(start..end).ok_or(StateCodecError::Truncated(o))?;
            let padded = end + (8 - len % 8) % 8;
            let pad = b.get(end..padded).ok_or(StateCodecError::Truncated(end))?;
            if pad.iter().any(|&x| x != 0) {
                return Err(StateCodecError::Padding(tag));
            }
            if !seen.insert(tag) {
                return Err(StateCodecError::Duplicate(tag));
            }
            if fields.len() == MAX_FIELDS {
                return Err(StateCodecError::TooManyFields);
            }
            fields.push((tag, data));
            o = padded;
        }
        let used = vec![false; fields.len()];
        Ok(Decoder { fields, used })
    }

    /// The bytes of a field, if present.
    pub fn get(&mut self, tag: u32) -> Option<&'a [u8]> {
        let i = self.fields.iter().position(|f| f.0 == tag)?;
        self.used[i] = true;
        Some(self.fields[i].1)
    }

    /// The bytes of a mandatory field.
    pub fn require(&mut self, tag: u32) -> Result<&'a [u8], StateCodecError> {
        self.get(tag).ok_or(StateCodecError::Missing(tag))
    }

    pub fn require_u64(&mut self, tag: u32) -> Result<u64, StateCodecError> {
        let b = self.require(tag)?;
        let a: [u8; 8] = b.try_into().map_err(|_| StateCodecError::Length { tag, want: 8, got: b.len() })?;
        Ok(u64::from_le_bytes(a))
    }

    pub fn require_pod<T: Pod>(&mut self, tag: u32) -> Result<T, StateCodecError> {
        let b = self.require(tag)?;
        pod_from_bytes(tag, b)
    }

    /// Fails if an unknown mandatory field was not read.
    pub fn finish(self) -> Result<(), StateCodecError> {
        for (i, (tag, _)) in self.fields.iter().enumerate() {
            if !self.used[i] && tag & OPTIONAL_TAG == 0 {
                return Err(StateCodecError::Unknown(*tag));
            }
        }
        Ok(())
    }
}

/// Plain-old-data kvm-bindings structs: every bit pattern is valid and there is no implicit
/// padding (bindgen spells padding out as fields).
///
/// # Safety
/// Implement only for `#[repr(C)]` types made of integers and arrays of integers, for which any
/// byte pattern of the right size is a valid value.
pub unsafe trait Pod: Copy + Default {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: a bindgen-generated #[repr(C)] KVM ABI struct of integers; any bytes are valid.
        unsafe impl Pod for $t {}
    )* };
}
pod!(
    kvm_bindings::kvm_regs,
    kvm_bindings::kvm_sregs,
    kvm_bindings::kvm_fpu,
    kvm_bindings::kvm_xcrs,
    kvm_bindings::kvm_lapic_state,
    kvm_bindings::kvm_vcpu_events,
    kvm_bindings::kvm_mp_state,
    kvm_bindings::kvm_debugregs,
    kvm_bindings::kvm_irqchip,
    kvm_bindings::kvm_pit_state2,
    kvm_bindings::kvm_clock_data
);

/// The bytes of a POD value.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod: plain integers without implicit padding, so all size_of::<T>() bytes
    // are initialized; the slice borrows v.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// A POD value from exactly `size_of::<T>()` bytes.
pub fn pod_from_bytes<T: Pod>(tag: u32, b: &[u8]) -> Result<T, StateCodecError> {
    let want = std::mem::size_of::<T>();
    if b.len() != want {
        return Err(StateCodecError::Length { tag, want, got: b.len() });
    }
    // SAFETY: b has exactly size_of::<T>() bytes and T is Pod (any bytes are a valid T);
    // read_unaligned copes with the buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_unknown_optional_fields_are_skipped() {
        let b = Encoder::new().u64(1, 7).field(OPTIONAL_TAG | 9, b"abc").field(2, b"xyz12345").finish();

        let mut d = Decoder::parse(&b).unwrap();

        assert_eq!(d.require_u64(1).unwrap(), 7);
        assert_eq!(d.require(2).unwrap(), b"xyz12345");
        assert!(d.finish().is_ok());
    }

    #[test]
    fn unknown_mandatory_field_fails() {
        let b = Encoder::new().u64(1, 7).field(5, b"new").finish();
        let mut d = Decoder::parse(&b).unwrap();
        d.require_u64(1).unwrap();

        assert_eq!(d.finish(), Err(StateCodecError::Unknown(5)));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = Encoder::new().u64(1, 7).field(2, b"hello").finish();
        let decode = |b: &[u8]| -> Result<(u64, Vec<u8>), StateCodecError> {
            let mut d = Decoder::parse(b)?;
            Ok((d.require_u64(1)?, d.require(2)?.to_vec()))
        };
        assert!(decode(&b).is_ok());
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn pod_of_the_wrong_size_is_refused() {
        let r: Result<kvm_bindings::kvm_regs, _> = pod_from_bytes(3, &[0u8; 10]);

        assert!(matches!(r, Err(StateCodecError::Length { tag: 3, got: 10, .. })));
    }
}
