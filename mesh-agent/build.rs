//! Embeds the kernel programs when they have been built (`cargo xtask build` does it
//! first). Without them the agent still builds (so `cargo clippy` needs no BPF
//! toolchain) and asks for `--bpf-object` at run time.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let built = env::var_os("MESH_EBPF_OBJECT")
        .map_or_else(|| manifest.join("../mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf"), PathBuf::from);
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", built.display());
    let bytes = fs::read(&built).unwrap_or_default();
    fs::write(out.join("mesh-ebpf.o"), bytes).expect("write OUT_DIR/mesh-ebpf.o");
}
