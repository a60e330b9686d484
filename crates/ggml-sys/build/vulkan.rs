//! The `vulkan` feature: ggml's Vulkan backend compiled from the same pinned tree.
//!
//! ggml's CMake does four things, done here in order: probe which shader extensions `glslc` knows,
//! build the `vulkan-shaders-gen` host tool, run it (a header, then one C++ file of SPIR-V byte arrays
//! per compute shader, compiled by `glslc`), and compile the backend with those files. The backend's
//! instance creation names `VK_EXT_layer_settings` types, which Vulkan headers gained in 1.3.272
//! (Debian 12 has 1.3.239): a copy of that one file is compiled with the block under
//! `#if defined(VK_EXT_layer_settings)` (it is only used by ggml's validation mode).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Shader features `glslc` may lack: (extension, probe shader, define for the tool and the backend).
const PROBES: &[(&str, &str, &str)] = &[
    ("GL_KHR_cooperative_matrix", "coopmat.comp", "GGML_VULKAN_COOPMAT_GLSLC_SUPPORT"),
    ("GL_NV_cooperative_matrix2", "coopmat2.comp", "GGML_VULKAN_COOPMAT2_GLSLC_SUPPORT"),
    ("GL_NV_cooperative_matrix_decode_vector", "coopmat2_decode_vector.comp", "GGML_VULKAN_COOPMAT2_DECODE_VECTOR_GLSLC_SUPPORT"),
    ("GL_EXT_integer_dot_product", "integer_dot.comp", "GGML_VULKAN_INTEGER_DOT_GLSLC_SUPPORT"),
    ("GL_EXT_bfloat16", "bfloat16.comp", "GGML_VULKAN_BFLOAT16_GLSLC_SUPPORT"),
    ("GL_EXT_float_e2m1", "float_e2m1.comp", "GGML_VULKAN_FLOAT_E2M1_GLSLC_SUPPORT"),
    ("GL_EXT_float_e4m3", "float_e4m3.comp", "GGML_VULKAN_FLOAT_E4M3_GLSLC_SUPPORT"),
];

/// The backend's own C++ files (relative to `src/ggml-vulkan/`), besides the generated ones.
const SOURCES: &[&str] = &["ggml-vulkan-buffers.cpp", "ggml-vulkan-debug.cpp"];

/// Where the instance creation names `VK_EXT_layer_settings` types (start and end of the block).
const LAYER_SETTINGS_START: &str = "    std::vector<vk::LayerSettingEXT> settings = {";
const LAYER_SETTINGS_END: &str =
    "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);\n";

fn fail(what: &str) -> ! {
    eprintln!("error: the `vulkan` feature: {what}");
    eprintln!("hint: `make setup FEATURES=vulkan` installs glslc, libvulkan-dev and spirv-headers (Debian packages);");
    eprintln!("      GLSLC or VULKAN_SDK point at another glslc.");
    std::process::exit(1);
}

fn glslc() -> PathBuf {
    println!("cargo:rerun-if-env-changed=GLSLC");
    println!("cargo:rerun-if-env-changed=VULKAN_SDK");
    let path = match (env::var_os("GLSLC"), env::var_os("VULKAN_SDK")) {
        (Some(g), _) => PathBuf::from(g),
        (None, Some(sdk)) => PathBuf::from(sdk).join("bin/glslc"),
        (None, None) => PathBuf::from("glslc"),
    };
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => path,
        _ => fail(&format!("cannot run the shader compiler `{}`", path.display())),
    }
}

/// The defines of the shader features this `glslc` compiles (its probe shader compiles).
fn probe(glslc: &Path, tests: &Path) -> Vec<&'static str> {
    PROBES
        .iter()
        .filter(|(_, file, _)| {
            Command::new(glslc)
                .args(["-o", "-", "-fshader-stage=compute", "--target-env=vulkan1.3"])
                .arg(tests.join(file))
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .map(|&(_, _, define)| define)
        .collect()
}

/// Builds `vulkan-shaders-gen` for this machine (a host tool: cc builds archives, so the compiler is
/// called directly).
fn build_generator(shaders: &Path, defines: &[&str], out: &Path) -> PathBuf {
    let exe = out.join("vulkan-shaders-gen");
    let compiler = cc::Build::new().cpp(true).cargo_metadata(false).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-std=c++17", "-O2", "-pthread", "-w"]).arg(shaders.join("vulkan-shaders-gen.cpp")).arg("-o").arg(&exe);
    for define in defines {
        cmd.arg(format!("-D{define}"));
    }
    match cmd.status() {
        Ok(s) if s.success() => exe,
        _ => fail("building vulkan-shaders-gen failed"),
    }
}

/// Runs the generator: the shaders' header, then one C++ file per compute shader. Returns the C++
/// files and the header's folder.
fn generate(generator: &Path, glslc: &Path, shaders: &Path, out: &Path) -> (Vec<PathBuf>, PathBuf) {
    let (spv, gen) = (out.join("vulkan-shaders.spv"), out.join("vulkan-generated"));
    std::fs::create_dir_all(&gen).unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", gen.display())));
    let header = gen.join("ggml-vulkan-shaders.hpp");
    let run = |args: &[&std::ffi::OsStr], what: &str| {
        let ok = Command::new(generator).args(args).status().is_ok_and(|s| s.success());
        if !ok {
            fail(&format!("vulkan-shaders-gen failed on {what}"));
        }
    };
    run(&["--output-dir".as_ref(), spv.as_os_str(), "--target-hpp".as_ref(), header.as_os_str()], "the header");
    let mut comps: Vec<PathBuf> = std::fs::read_dir(shaders)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", shaders.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "comp"))
        .collect();
    comps.sort();
    let mut cpps = Vec::new();
    for comp in comps {
        let name = comp.file_name().expect("a .comp file has a name").to_string_lossy().into_owned();
        let cpp = gen.join(format!("{name}.cpp"));
        run(
            &[
                "--glslc".as_ref(),
                glslc.as_os_str(),
                "--source".as_ref(),
                comp.as_os_str(),
                "--output-dir".as_ref(),
                spv.as_os_str(),
                "--target-hpp".as_ref(),
                header.as_os_str(),
                "--target-cpp".as_ref(),
                cpp.as_os_str(),
            ],
            &name,
        );
        cpps.push(cpp);
    }
    (cpps, gen)
}

/// ggml-vulkan.cpp, copied with the `VK_EXT_layer_settings` block guarded (unchanged if the block is
/// not found: a tree that no longer has it needs no guard).
fn patched_backend(vulkan: &Path, out: &Path) -> PathBuf {
    let source = vulkan.join("ggml-vulkan.cpp");
    let text = std::fs::read_to_string(&source).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", source.display())));
    let (Some(start), Some(end)) = (text.find(LAYER_SETTINGS_START), text.find(LAYER_SETTINGS_END)) else { return source };
    let end = end + LAYER_SETTINGS_END.len();
    let plain = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);\n";
    let patched =
        format!("{}#if defined(VK_EXT_layer_settings)\n{}#else\n{plain}#endif\n{}", &text[..start], &text[start..end], &text[end..]);
    let copy = out.join("ggml-vulkan.cpp");
    std::fs::write(&copy, patched).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", copy.display())));
    copy
}

/// Compiles the backend into objects for the main archive (ggml's registry calls into it and it into
/// ggml), and links the Vulkan loader.
pub fn compile(ggml_dir: &Path, mut build: cc::Build, out: &Path) -> Vec<PathBuf> {
    let vulkan = ggml_dir.join("src/ggml-vulkan");
    let shaders = vulkan.join("vulkan-shaders");
    let glslc = glslc();
    let defines = probe(&glslc, &shaders.join("feature-tests"));
    let generator = build_generator(&shaders, &defines, out);
    let (cpps, generated) = generate(&generator, &glslc, &shaders, out);
    build.cpp(true).std("c++17").include(&vulkan).include(&generated).file(patched_backend(&vulkan, out));
    build.files(SOURCES.iter().map(|f| vulkan.join(f))).files(cpps);
    for define in defines {
        build.define(define, None);
    }
    println!("cargo:rustc-link-lib=vulkan");
    build.compile_intermediates()
}
