//! The generated kernel interfaces are current and agree across C, Rust and the generator. Runs
//! without the `cuda` feature and without CUDA: the generator (codegen/) and the Rust mirrors
//! (src/cuda/params.rs) are included as plain modules, and params.h is compiled by the host C
//! compiler, whose static asserts check the C layout.

#[allow(dead_code)]
#[path = "../codegen/src/lib.rs"]
mod codegen;

#[allow(dead_code)]
#[rustfmt::skip]
#[path = "../src/cuda/params.rs"]
mod params;

use std::path::{Path, PathBuf};
use std::process::Command;

use codegen::layout::{layout, FieldLayout};
use codegen::spec::{field, Access, Elem, Field, ParamStruct, Ty, FAMILIES, STRUCTS};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn spec_is_consistent() {
    codegen::emit::check_spec().unwrap();
}

#[test]
fn checked_in_files_are_current() {
    let scratch = tempfile::tempdir().unwrap();
    let written = codegen::write_all(scratch.path()).unwrap();
    assert_eq!(written.len(), codegen::emit::generate().len());
    let mut stale = Vec::new();
    for path in written {
        let relative = path.strip_prefix(scratch.path()).unwrap();
        let fresh = std::fs::read(&path).unwrap();
        let checked_in = std::fs::read(repo().join(relative)).unwrap_or_default();
        if fresh != checked_in {
            stale.push(relative.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `cargo run --manifest-path codegen/Cargo.toml` and commit the result"
    );
}

#[test]
fn rust_layouts_match_the_generator() {
    let compiled = params::compiled_layouts();
    assert_eq!(compiled.len(), STRUCTS.len());
    for (spec, rust) in STRUCTS.iter().zip(&compiled) {
        let c = layout(spec);
        assert_eq!(rust.name, c.name);
        assert_eq!(rust.size, c.size, "{}: size", c.name);
        assert_eq!(rust.align, c.align, "{}: alignment", c.name);
        let rust_fields: Vec<FieldLayout> = rust
            .fields
            .iter()
            .map(|&(name, offset, size)| FieldLayout { name, offset, size })
            .collect();
        assert_eq!(rust_fields, c.fields, "{}: fields", c.name);
    }
}

#[test]
fn layout_pads_like_a_c_compiler() {
    // u32, pointer, u32, f32, pointer, u32: padding before each pointer and at the end.
    const FIELDS: &[Field] = &[
        field("a", Ty::U32, ""),
        field("p", Ty::Ptr(Access::Read, Elem::Bf16), ""),
        field("b", Ty::U32, ""),
        field("c", Ty::F32, ""),
        field("q", Ty::Ptr(Access::Write, Elem::F32), ""),
        field("d", Ty::U32, ""),
    ];
    let l = layout(&ParamStruct {
        name: "Padded",
        doc: "",
        fields: FIELDS,
    });
    let offsets: Vec<usize> = l.fields.iter().map(|f| f.offset).collect();
    assert_eq!(offsets, [0, 8, 16, 20, 24, 32]);
    assert_eq!((l.size, l.align), (40, 8));

    #[repr(C)]
    struct Padded {
        a: u32,
        p: u64,
        b: u32,
        c: f32,
        q: u64,
        d: u32,
    }
    assert_eq!(std::mem::size_of::<Padded>(), l.size);
    assert_eq!(std::mem::offset_of!(Padded, c), l.fields[3].offset);
    assert_eq!(std::mem::offset_of!(Padded, d), l.fields[5].offset);
}

#[test]
fn variant_table_lists_every_instantiation() {
    let expected: Vec<(String, Vec<u32>)> = FAMILIES
        .iter()
        .flat_map(|f| {
            codegen::emit::variants(f)
                .into_iter()
                .map(|v| (v.symbol, v.consts))
        })
        .collect();
    let actual: Vec<(String, Vec<u32>)> = params::KERNEL_VARIANTS
        .iter()
        .map(|v| (v.symbol.to_string(), v.consts.to_vec()))
        .collect();
    assert_eq!(actual, expected);
    // The cross product: attention_decode has one kernel per (head_dim, group).
    let attention = FAMILIES
        .iter()
        .find(|f| f.name == "attention_decode")
        .unwrap();
    let product: usize = attention.axes.iter().map(|a| a.values.len()).product();
    assert_eq!(codegen::emit::variants(attention).len(), product);
}

#[test]
fn every_family_is_defined_in_its_source_file() {
    for family in FAMILIES {
        let path = repo().join("csrc").join(format!("{}.cu", family.file));
        let source =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let expansion = format!("MIXTRAL_{}_VARIANTS(", family.name.to_uppercase());
        assert!(
            source.contains(&expansion),
            "{} does not expand {expansion}",
            path.display()
        );
        // An entry `MX_ENTRY(symbol, (bounds), XParams, body)` (csrc/common.cuh).
        assert!(
            source.contains(&format!("), {},", family.params)),
            "{} defines no MX_ENTRY taking {}",
            path.display(),
            family.params
        );
    }
}

/// Compiles `params.h` (and `shims.h`, which includes it) with the host C compiler as C11 and as
/// C++17; its static asserts compare the compiler's layout with the generator's numbers.
#[test]
fn c_layouts_match_the_generator() {
    let Some(cc) = ["cc", "gcc", "clang"]
        .into_iter()
        .find(|cc| Command::new(cc).arg("--version").output().is_ok())
    else {
        eprintln!(
            "no host C compiler found: the C layout is checked by nvcc in the cuda build only"
        );
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let header = repo().join("csrc/generated/params.h");
    let shims = repo().join("csrc/generated/shims.h");
    for (lang, std_flag, file) in [
        ("c", "-std=c11", "check.c"),
        ("c++", "-std=c++17", "check.cpp"),
    ] {
        let source = scratch.path().join(file);
        let includes = format!(
            "#include \"{}\"\n#include \"{}\"\n",
            header.display(),
            shims.display()
        );
        std::fs::write(&source, includes).unwrap();
        let output = compile(cc, lang, std_flag, &source);
        assert!(
            output.status.success(),
            "{cc} ({lang}) rejects params.h or shims.h:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The asserts are live: a wrong size is rejected.
    let source = scratch.path().join("wrong.c");
    let first = &STRUCTS[0];
    std::fs::write(
        &source,
        format!(
            "#include \"{}\"\nMX_STATIC_ASSERT(sizeof({}) == {}, \"wrong\");\n",
            header.display(),
            first.name,
            layout(first).size + 8
        ),
    )
    .unwrap();
    assert!(!compile(cc, "c", "-std=c11", &source).status.success());
    // The shim declarations are live: a definition in csrc/cutlass/ taking another struct than the
    // one declared (and mirrored in src/cuda/shims.rs) is rejected.
    let source = scratch.path().join("wrong_shim.cpp");
    std::fs::write(
        &source,
        format!(
            "#include \"{}\"\nextern \"C\" int mx_moe_cutlass_run(const MoeCutlassQ8Params* p, \
             void* s) {{ return p != 0 && s != 0; }}\n",
            shims.display()
        ),
    )
    .unwrap();
    assert!(!compile(cc, "c++", "-std=c++17", &source).status.success());
}

fn compile(cc: &str, lang: &str, std_flag: &str, source: &Path) -> std::process::Output {
    Command::new(cc)
        .args(["-fsyntax-only", "-Wall", "-Werror", std_flag, "-x", lang])
        .arg(source)
        .output()
        .unwrap()
}
