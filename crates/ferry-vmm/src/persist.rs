//! How everything with state is saved and rebuilt: one pair of traits, shaped like
//! Firecracker's `Persist`.
//!
//! - [`SectionState`] is a state section's body: its section id, the version this Ferry writes,
//!   the versions it reads, and the codec. [`decode_section`] is the one place a section's
//!   version is checked: the current and the previous version are read (the previous through an
//!   explicit upgrade in the type's `decode`), anything else is refused naming the section, the
//!   version found and the versions supported.
//! - [`Persist`] is a live object with such state: `save` reads it (the machine is paused), and
//!   `restore` *constructs* the object from its state and what it is built on. Nothing is made
//!   with defaults and patched afterwards.
//!
//! The machine (`crate::machine_state`) lists its parts; `ferry-migrate` moves the sections
//! without knowing which device each belongs to. Neither trait has default method bodies.

use std::fmt;

/// Where a section goes in a stream: its record and the part of the machine it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionKey {
    /// VM_STATE: the VM-wide KVM state.
    Vm,
    /// VCPU_STATE of this vCPU.
    Vcpu(u32),
    /// DEVICE_STATE of a device: its section id and instance.
    Device { id: String, instance: u32 },
}

impl fmt::Display for SectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionKey::Vm => f.write_str("VM-wide state"),
            SectionKey::Vcpu(id) => write!(f, "vCPU {id} state"),
            SectionKey::Device { id, instance } => write!(f, "device '{id}' instance {instance}"),
        }
    }
}

/// One encoded section, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub key: SectionKey,
    pub version: u32,
    pub body: Vec<u8>,
}

/// Errors of reading a section.
#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    #[error(
        "{key} is section '{name}' version {found}, which this Ferry cannot read (it reads versions {})",
        versions(supported)
    )]
    Version { key: SectionKey, name: &'static str, found: u32, supported: &'static [u32] },
    #[error("{key} (section '{name}' version {version}) is invalid")]
    Body {
        key: SectionKey,
        name: &'static str,
        version: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn versions(v: &[u32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" and ")
}

/// A versioned state section body.
pub trait SectionState: Sized {
    /// The section's id (DEVICE_STATE ids are at most 16 ASCII bytes).
    const NAME: &'static str;
    /// The version this Ferry writes.
    const VERSION: u32;
    /// The versions this Ferry reads: [`Self::VERSION`] and the one before it.
    const READS: &'static [u32];
    type Error: std::error::Error + Send + Sync + 'static;

    /// The body at [`Self::VERSION`].
    fn encode(&self) -> Vec<u8>;

    /// Reads a body of `version`, one of [`Self::READS`]; an older one goes through its explicit
    /// upgrade to the current layout.
    fn decode(version: u32, body: &[u8]) -> Result<Self, Self::Error>;
}

/// Decodes a section of `key` after checking its version against what `S` reads.
pub fn decode_section<S: SectionState>(key: &SectionKey, version: u32, body: &[u8]) -> Result<S, SectionError> {
    if !S::READS.contains(&version) {
        return Err(SectionError::Version { key: key.clone(), name: S::NAME, found: version, supported: S::READS });
    }
    S::decode(version, body).map_err(|e| SectionError::Body {
        key: key.clone(),
        name: S::NAME,
        version,
        source: Box::new(e),
    })
}

/// Encodes `state` as the section `key`.
pub fn encode_section<S: SectionState>(key: SectionKey, state: &S) -> Section {
    Section { key, version: S::VERSION, body: state.encode() }
}

/// Something with state that moves with the machine.
pub trait Persist: Sized {
    type State: SectionState;
    /// What restore builds the object on (fresh KVM objects, file descriptors, sinks).
    type ConstructorArgs<'a>;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads the object's state (the machine is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds the object from its saved state.
    fn restore(args: Self::ConstructorArgs<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Two(u8, u8);

    #[derive(Debug, thiserror::Error)]
    #[error("bad body")]
    struct Bad;

    impl SectionState for Two {
        const NAME: &'static str = "two";
        const VERSION: u32 = 2;
        const READS: &'static [u32] = &[2, 1];
        type Error = Bad;
        fn encode(&self) -> Vec<u8> {
            vec![self.0, self.1]
        }
        fn decode(version: u32, body: &[u8]) -> Result<Self, Bad> {
            match (version, body) {
                (2, [a, b]) => Ok(Two(*a, *b)),
                // Version 1 had one byte; the upgrade gives the new one its neutral value.
                (1, [a]) => Ok(Two(*a, 0)),
                _ => Err(Bad),
            }
        }
    }

    #[test]
    fn the_current_and_the_previous_version_are_read_the_previous_through_its_upgrade() {
        let k = SectionKey::Device { id: "two".into(), instance: 0 };
        assert_eq!(decode_section::<Two>(&k, 2, &[4, 5]).unwrap(), Two(4, 5));
        assert_eq!(decode_section::<Two>(&k, 1, &[4]).unwrap(), Two(4, 0));
    }

    #[test]
    fn an_unknown_version_is_refused_naming_the_section_the_version_and_the_versions_read() {
        let k = SectionKey::Device { id: "two".into(), instance: 3 };

        let e = decode_section::<Two>(&k, 7, &[4, 5]).unwrap_err().to_string();

        assert_eq!(
            e,
            "device 'two' instance 3 is section 'two' version 7, which this Ferry cannot read (it reads versions 2 and 1)"
        );
    }

    #[test]
    fn a_bad_body_names_the_section_and_its_version() {
        let e = decode_section::<Two>(&SectionKey::Vcpu(1), 2, &[1]).unwrap_err();
        assert_eq!(e.to_string(), "vCPU 1 state (section 'two' version 2) is invalid");
        assert!(std::error::Error::source(&e).is_some());
    }
}
