//! C layout of a parameter struct as the generator computes it (x86-64 / CUDA ABI: natural
//! alignment, fields in declaration order, size rounded up to the largest alignment). The generated
//! C and Rust code assert that their compilers agree with these numbers.

use super::spec::{ParamStruct, Ty};

/// Placement of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldLayout {
    /// Field name.
    pub name: &'static str,
    /// Byte offset from the start of the struct.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Placement of a whole struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    /// Struct name.
    pub name: &'static str,
    /// `sizeof`, padding included.
    pub size: usize,
    /// `alignof`.
    pub align: usize,
    /// Fields in declaration order.
    pub fields: Vec<FieldLayout>,
}

/// Size and alignment of a field type.
pub fn size_align(ty: Ty) -> (usize, usize) {
    match ty {
        Ty::Ptr(..) => (8, 8),
        Ty::U32 | Ty::F32 => (4, 4),
    }
}

fn round_up(value: usize, align: usize) -> usize {
    value.div_ceil(align) * align
}

/// Lays out `s` the way a C compiler does.
pub fn layout(s: &ParamStruct) -> StructLayout {
    let mut offset = 0;
    let mut align = 1;
    let mut fields = Vec::with_capacity(s.fields.len());
    for f in s.fields {
        let (size, field_align) = size_align(f.ty);
        offset = round_up(offset, field_align);
        fields.push(FieldLayout {
            name: f.name,
            offset,
            size,
        });
        offset += size;
        align = align.max(field_align);
    }
    StructLayout {
        name: s.name,
        size: round_up(offset, align),
        align,
        fields,
    }
}
