//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): the socket-owner programs read a few fields of
//! `struct sock`, `struct net` and `struct task_struct`, whose layout differs between
//! kernel builds.
//!
//! Written here rather than taken from a crate: aya parses BTF but keeps struct members
//! to itself, and the one crate that exposes them (btf-rs) is LGPL, which this
//! MIT/Apache binary cannot link statically. Only what the lookup needs is decoded.

use std::{fs, io, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: io::Error },
    #[error("not BTF data (bad magic or truncated header)")]
    Header,
    #[error("BTF type {0} is truncated or of an unknown kind")]
    Type(u32),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no field {field} (or it is a bit field)")]
    NoField { strukt: String, field: String },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
const KIND_MAX: u32 = 19;

struct Type {
    name_off: u32,
    kind: u32,
    /// For a struct or union its members; for a modifier or typedef the type it names.
    members: Vec<Member>,
    target: u32,
}

struct Member {
    name_off: u32,
    ty: u32,
    /// Bits from the start of the enclosing type.
    bit_offset: u32,
    bitfield: bool,
}

pub struct Btf {
    /// Indexed by type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|error| BtfError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&data)
    }

    /// Parses BTF in the machine's byte order (the kernel's own, as sysfs serves it).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        let magic = data
            .get(0..2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .ok_or(BtfError::Header)?;
        if magic != MAGIC {
            return Err(BtfError::Header);
        }
        let field = |at| u32_at(at).map(|v| v as usize).ok_or(BtfError::Header);
        let hdr_len = field(4)?;
        let (type_off, type_len) = (hdr_len + field(8)?, field(12)?);
        let (str_off, str_len) = (hdr_len + field(16)?, field(20)?);
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or(BtfError::Header)?
            .to_vec();
        let end = type_off + type_len;
        if data.len() < end {
            return Err(BtfError::Header);
        }
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            members: Vec::new(),
            target: 0,
        }];
        let mut at = type_off;
        while at < end {
            let id = types.len() as u32;
            let truncated = || BtfError::Type(id);
            let word = |i: usize| u32_at(at + 4 * i).ok_or_else(truncated);
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                0 => return Err(truncated()),
                k if k > KIND_MAX => return Err(truncated()),
                _ => 0,
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..vlen {
                    let m = |j: usize| u32_at(at + 12 * i + 4 * j).ok_or_else(truncated);
                    let (name_off, ty, offset) = (m(0)?, m(1)?, m(2)?);
                    let (bit_offset, bitfield) = if kind_flag {
                        (offset & 0xff_ffff, offset >> 24 != 0)
                    } else {
                        (offset, false)
                    };
                    members.push(Member {
                        name_off,
                        ty,
                        bit_offset,
                        bitfield,
                    });
                }
            }
            at += extra;
            types.push(Type {
                name_off,
                kind,
                members,
                target: size_or_type,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and modifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.target
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Bit offset of the member named `name` in a struct or union, looking inside its
    /// unnamed members too (as C does).
    fn member(&self, ty: &Type, name: &[u8]) -> Option<(u32, &Type)> {
        for member in &ty.members {
            let inner = self.resolve(member.ty)?;
            if member.name_off == 0 {
                if let Some((offset, found)) = self.member(inner, name) {
                    return Some((member.bit_offset + offset, found));
                }
            } else if self.name(member.name_off) == name {
                return (!member.bitfield).then_some((member.bit_offset, inner));
            }
        }
        None
    }

    /// Byte offset of `path` (field names joined by dots, through nested structs) in
    /// `struct strukt`.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut ty = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT
                    && !t.members.is_empty()
                    && self.name(t.name_off) == strukt.as_bytes()
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let no_field = || BtfError::NoField {
            strukt: strukt.to_owned(),
            field: path.to_owned(),
        };
        let mut bits = 0;
        for name in path.split('.') {
            let (offset, inner) = self.member(ty, name.as_bytes()).ok_or_else(no_field)?;
            bits += offset;
            ty = inner;
        }
        if bits % 8 != 0 {
            return Err(no_field());
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal BTF blob: `struct outer { int a; union { int b; struct inner c; }; }`
    /// with `struct inner { int x; int y; }` and `typedef struct inner inner_t`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0inner\0x\0y\0inner_t\0";
        let at = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| types.extend(words.iter().flat_map(|w| w.to_ne_bytes()));
        // 1: int
        push(&[at("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { int x; int y; }
        push(&[at("inner"), (KIND_STRUCT << 24) | 2, 8]);
        push(&[at("x"), 1, 0]);
        push(&[at("y"), 1, 32]);
        // 3: typedef struct inner inner_t
        push(&[at("inner_t"), KIND_TYPEDEF << 24, 2]);
        // 4: anonymous union { int b; inner_t c; }
        push(&[0, (KIND_UNION << 24) | 2, 8]);
        push(&[at("b"), 1, 0]);
        push(&[at("c"), 3, 0]);
        // 5: struct outer { int a; union ...; }
        push(&[at("outer"), (KIND_STRUCT << 24) | 2, 12]);
        push(&[at("a"), 1, 0]);
        push(&[0, 4, 32]);
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_ne_bytes());
        blob.extend([1u8, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(word.to_ne_bytes());
        }
        blob.extend(types);
        blob.extend(strings);
        blob
    }

    #[test]
    fn finds_fields_through_unnamed_members_and_typedefs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset("outer", "b").unwrap(), 4);
        assert_eq!(btf.offset("outer", "c.y").unwrap(), 8);
        assert!(matches!(
            btf.offset("outer", "z"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.offset("nothing", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"not btf at all, no"),
            Err(BtfError::Header)
        ));
        let mut cut = sample();
        cut.truncate(40);
        assert!(Btf::parse(&cut).is_err());
    }

    /// The running kernel's own BTF, as the agent reads it: `struct sock` opens with the
    /// destination address, as it has for as long as BTF exists.
    #[test]
    fn reads_the_running_kernels_btf() {
        let btf = Btf::from_sys_fs().unwrap();
        assert_eq!(btf.offset("sock", "__sk_common.skc_daddr").unwrap(), 0);
        assert_eq!(btf.offset("sock", "__sk_common.skc_dport").unwrap(), 12);
        assert!(btf.offset("task_struct", "comm").unwrap() > 0);
    }
}
