//! Compiles the C++ shim over MLX against the headers and library of the
//! pinned `mlx` Python wheel, found through the Python interpreter that
//! maturin/uv (or `cargo test`) uses.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Folders of the `mlx` package that hold `include/mlx/mlx.h` and `lib/`.
fn find_mlx() -> PathBuf {
    if let Ok(dir) = env::var("MLX_DIR") {
        return PathBuf::from(dir);
    }
    let mut pythons: Vec<String> = ["PYO3_PYTHON", "PYTHON_SYS_EXECUTABLE", "VIRTUAL_ENV"]
        .iter()
        .filter_map(|k| env::var(k).ok())
        .map(|v| {
            if Path::new(&v).is_dir() {
                format!("{v}/bin/python")
            } else {
                v
            }
        })
        .collect();
    let manifest = env::var("CARGO_MANIFEST_DIR").unwrap();
    pythons.push(format!("{manifest}/.venv/bin/python"));
    pythons.push("python3".into());
    // `mlx` is a namespace package (mlx and mlx-cpu/-metal/-cuda share it), so
    // every search location is tried.
    let probe = "import importlib.util as u; s = u.find_spec('mlx'); \
                 print('\\n'.join(s.submodule_search_locations) if s else '')";
    for py in &pythons {
        let Ok(out) = Command::new(py).args(["-c", probe]).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let dir = PathBuf::from(line.trim());
            if dir.join("include/mlx/mlx.h").exists() {
                return dir;
            }
        }
    }
    panic!(
        "MLX was not found. Install the pinned wheel (`uv sync`, or `pip install mlx[cpu]==0.32.4`) \
         in the Python that builds mlx-dist, or set MLX_DIR to the folder holding include/mlx/mlx.h. \
         Pythons tried: {pythons:?}"
    );
}

/// Generates the gRPC code from `proto/` with the pure-Rust `protox`
/// compiler, so no `protoc` is needed.
fn compile_proto() {
    println!("cargo:rerun-if-changed=proto");
    let fds =
        protox::compile(["mlx_dist/v3/worker.proto"], ["proto"]).expect("proto/ does not compile");
    tonic_prost_build::configure()
        .bytes(".")
        // What a worker reports reaches Python and status pages as is.
        .type_attribute(".mlx_dist.v3.DeviceInfo", "#[derive(serde::Serialize)]")
        .type_attribute(".mlx_dist.v3.Capabilities", "#[derive(serde::Serialize)]")
        .type_attribute(".mlx_dist.v3.EngineStats", "#[derive(serde::Serialize)]")
        .type_attribute(".mlx_dist.v3.MlxMemory", "#[derive(serde::Serialize)]")
        .type_attribute(".mlx_dist.v3.Traffic", "#[derive(serde::Serialize)]")
        .type_attribute(".mlx_dist.v3.ShardInfo", "#[derive(serde::Serialize)]")
        .compile_fds(fds)
        .expect("gRPC code generation failed");
}

fn main() {
    compile_proto();
    println!("cargo:rerun-if-changed=src/mlx/shim.cpp");
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let mlx = find_mlx();
    let include = mlx.join("include");
    let lib = mlx.join("lib");

    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("src/mlx/shim.cpp")
        .include(&include)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .opt_level(2)
        .compile("mlx_dist_shim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    // Installed wheels find libmlx beside themselves in site-packages; test
    // binaries and in-tree builds find it where it was built against. At run
    // time from Python, `import mlx.core` has loaded it already.
    let origin = if target_os == "macos" {
        "@loader_path"
    } else {
        "$ORIGIN"
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{origin}/../mlx/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=MLX_DIST_MLX_DIR={}", mlx.display());
}
