//! Compiles ggml's CPU backend from the pinned `llama-cpp-sys-2` package and generates bindings.
//!
//! The source is never committed: `make setup` runs `cargo fetch`, which downloads the exact package
//! version pinned (with its checksum) in Cargo.lock, and this script finds it with `cargo metadata`.
//! `GGML_SRC_DIR` overrides the location (a `ggml` tree holding `include/` and `src/`).
//! `CCSM_GGML_MARCH=x86-64-v3` builds the kernels another CPU would get (AVX2 on an AVX-512 machine).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/vulkan.rs"]
mod vulkan;

/// The package that carries the ggml tree, and its pinned version (keep in sync with Cargo.toml).
const SOURCE_PACKAGE: &str = "llama-cpp-sys-2";
const SOURCE_VERSION: &str = "0.1.161";
/// The ggml version inside that package (from its CMakeLists.txt), written into ggml-version.h.
const GGML_VERSION: &str = "0.26.0";

/// C files of the CPU backend for this ggml version (relative to `src/`).
const C_SOURCES: &[&str] =
    &["ggml.c", "ggml-alloc.c", "ggml-quants.c", "ggml-cpu/ggml-cpu.c", "ggml-cpu/quants.c", "ggml-cpu/arch/x86/quants.c"];

/// C++ files of the CPU backend for this ggml version (relative to `src/`).
const CXX_SOURCES: &[&str] = &[
    "ggml.cpp",
    "ggml-backend.cpp",
    "ggml-backend-meta.cpp",
    "ggml-opt.cpp",
    "ggml-threading.cpp",
    "gguf.cpp",
    "ggml-backend-reg.cpp",
    "ggml-backend-dl.cpp",
    "ggml-cpu/ggml-cpu.cpp",
    "ggml-cpu/repack.cpp",
    "ggml-cpu/hbm.cpp",
    "ggml-cpu/traits.cpp",
    "ggml-cpu/amx/amx.cpp",
    "ggml-cpu/amx/mmq.cpp",
    "ggml-cpu/tiled/tiled.cpp",
    "ggml-cpu/tiled/tiled-kernel.cpp",
    "ggml-cpu/binary-ops.cpp",
    "ggml-cpu/unary-ops.cpp",
    "ggml-cpu/vec.cpp",
    "ggml-cpu/ops.cpp",
    "ggml-cpu/arch/x86/repack.cpp",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=GGML_SRC_DIR");
    println!("cargo:rerun-if-env-changed=CCSM_GGML_MARCH");

    let ggml_dir = match locate_ggml_source() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("error: cannot find the ggml source tree: {why}");
            eprintln!("hint: run `make setup` (it fetches the pinned {SOURCE_PACKAGE} {SOURCE_VERSION} package),");
            eprintln!("      or point GGML_SRC_DIR at a ggml tree holding include/ and src/.");
            std::process::exit(1);
        }
    };
    println!("cargo:rustc-env=GGML_SOURCE_DIR={}", ggml_dir.display());
    println!("cargo:source_dir={}", ggml_dir.display());

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let generated_include = out_dir.join("include");
    std::fs::create_dir_all(&generated_include).expect("create generated include dir");
    std::fs::write(
        generated_include.join("ggml-version.h"),
        format!("#pragma once\n#define GGML_VERSION \"{GGML_VERSION}\"\n#define GGML_COMMIT \"{SOURCE_PACKAGE}-{SOURCE_VERSION}\"\n"),
    )
    .expect("write ggml-version.h");

    compile_ggml(&ggml_dir, &generated_include, &out_dir);
    generate_bindings(&ggml_dir, &out_dir);
}

fn locate_ggml_source() -> Result<PathBuf, String> {
    if let Ok(dir) = env::var("GGML_SRC_DIR") {
        return check_tree(PathBuf::from(dir));
    }
    match locate_with_cargo_metadata() {
        Ok(dir) => Ok(dir),
        // `cargo metadata` needs every locked package on disk (for all platforms); after a dependency
        // change that `cargo build` alone did not download, look in cargo's unpacked registry sources.
        Err(why) => locate_in_registry_sources().ok_or(why),
    }
}

fn locate_in_registry_sources() -> Option<PathBuf> {
    let cargo_home =
        env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let package = format!("{SOURCE_PACKAGE}-{SOURCE_VERSION}");
    std::fs::read_dir(cargo_home.join("registry/src"))
        .ok()?
        .filter_map(|index| index.ok())
        .map(|index| index.path().join(&package).join("llama.cpp/ggml"))
        .find_map(|tree| check_tree(tree).ok())
}

fn locate_with_cargo_metadata() -> Result<PathBuf, String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // --offline: the build never downloads; `make setup` does that, once, through `cargo fetch`.
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--manifest-path"])
        .arg(&manifest)
        .output()
        .map_err(|e| format!("could not run `cargo metadata`: {e}"))?;
    if !output.status.success() {
        return Err(format!("`cargo metadata` failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("unreadable `cargo metadata` output: {e}"))?;
    let package = metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == SOURCE_PACKAGE && p["version"] == SOURCE_VERSION))
        .ok_or_else(|| format!("package {SOURCE_PACKAGE} {SOURCE_VERSION} is not in the lock file"))?;
    let manifest_path = package["manifest_path"].as_str().ok_or("package has no manifest_path")?;
    let tree = Path::new(manifest_path).parent().ok_or("manifest_path has no parent")?.join("llama.cpp/ggml");
    check_tree(tree)
}

fn check_tree(dir: PathBuf) -> Result<PathBuf, String> {
    if dir.join("include/ggml.h").is_file() && dir.join("src/ggml.c").is_file() {
        Ok(dir)
    } else {
        Err(format!("{} is not a ggml tree (no include/ggml.h or src/ggml.c); the package may not be downloaded", dir.display()))
    }
}

fn feature(name: &str) -> bool {
    env::var_os(format!("CARGO_FEATURE_{}", name.to_uppercase())).is_some()
}

/// Flags and defines shared by the C and the C++ halves of the build.
fn base_build(ggml_dir: &Path, generated_include: &Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .include(ggml_dir.join("include"))
        .include(ggml_dir.join("src"))
        .include(ggml_dir.join("src/ggml-cpu"))
        .include(generated_include)
        .define("GGML_USE_CPU", None)
        .define("GGML_USE_CPU_REPACK", None)
        .define("GGML_SCHED_MAX_COPIES", "4")
        .define("_GNU_SOURCE", None)
        .define("_XOPEN_SOURCE", "600")
        // ggml's headers define many static functions that each file leaves unused.
        .warnings(false)
        .flag("-w");
    if env::var("OPT_LEVEL").map(|o| o != "0").unwrap_or(false) {
        build.define("NDEBUG", None);
    }
    if feature("portable") {
        build.flag("-march=x86-64");
    } else if let Ok(march) = env::var("CCSM_GGML_MARCH") {
        // Another CPU's kernels on this one (`x86-64-v3`: AVX2 without AVX-512), to see the rounding
        // a numeric test meets on the other kind of machine CI may run on.
        build.flag(format!("-march={march}")).flag("-mno-amx-tile").flag("-mno-amx-int8").flag("-mno-amx-bf16");
    } else {
        // The SIMD kernels are chosen at compile time from these flags. AMX tile instructions fault in
        // the VMs we run on, so they stay off even where the CPU reports them. AVX512-FP16 switches
        // ggml's f16 vectors to 128-element steps, which leaves head-sized (64) f16 rows to scalar
        // code: f16 KV decode at depth 2048 ran at less than half speed with it on.
        build.flag("-march=native").flag("-mno-amx-tile").flag("-mno-amx-int8").flag("-mno-amx-bf16").flag_if_supported("-mno-avx512fp16");
    }
    if feature("openmp") {
        build.define("GGML_USE_OPENMP", None).flag("-fopenmp");
    }
    if feature("llamafile") {
        build.define("GGML_USE_LLAMAFILE", None);
    }
    if feature("vulkan") {
        // ggml's backend registry then registers the Vulkan backend beside the CPU's.
        build.define("GGML_USE_VULKAN", None);
    }
    build
}

fn compile_ggml(ggml_dir: &Path, generated_include: &Path, out_dir: &Path) {
    let src = ggml_dir.join("src");
    // C objects are linked into the same archive as the C++ ones: the two halves call each other.
    let mut c_objects =
        base_build(ggml_dir, generated_include).std("c11").files(C_SOURCES.iter().map(|f| src.join(f))).compile_intermediates();
    if feature("vulkan") {
        c_objects.extend(vulkan::compile(ggml_dir, base_build(ggml_dir, generated_include), out_dir));
    }
    base_build(ggml_dir, generated_include)
        .cpp(true)
        .std("c++17")
        .files(CXX_SOURCES.iter().map(|f| src.join(f)))
        .files(feature("llamafile").then(|| src.join("ggml-cpu/llamafile/sgemm.cpp")))
        .objects(c_objects)
        .compile("ggml");
    if feature("openmp") {
        println!("cargo:rustc-link-lib=gomp");
    }
    println!("cargo:rustc-link-lib=m");
}

fn generate_bindings(ggml_dir: &Path, out_dir: &Path) {
    let mut builder = bindgen::Builder::default().header("wrapper.h");
    if feature("vulkan") {
        builder = builder.header(ggml_dir.join("include/ggml-vulkan.h").to_string_lossy());
    }
    let bindings = builder
        .clang_arg(format!("-I{}", ggml_dir.join("include").display()))
        .allowlist_function("ggml_.*|gguf_.*")
        .allowlist_type("ggml_.*|gguf_.*")
        .allowlist_var("GGML_.*|GGUF_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| {
            eprintln!("error: bindgen failed on ggml's headers: {e}");
            eprintln!("hint: bindgen needs libclang (Debian: libclang-dev); `make setup` installs it.");
            std::process::exit(1);
        });
    bindings.write_to_file(out_dir.join("bindings.rs")).expect("write bindings.rs");
}
