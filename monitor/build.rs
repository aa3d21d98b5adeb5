//! Builds the kernel programs (monitor-ebpf) for the BPF target and leaves the object in
//! OUT_DIR, where the agent embeds it.
fn main() -> anyhow::Result<()> {
    // The BPF target has no prebuilt `core`: aya-build passes `-Z build-std=core`, which a
    // pinned stable toolchain accepts only with RUSTC_BOOTSTRAP. Set here, for the nested
    // eBPF build alone, rather than for every crate of the workspace.
    // SAFETY: build scripts are single-threaded until build_ebpf spawns its child.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    // The same toolchain as rust-toolchain.toml: its LLVM must match bpf-linker's.
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("1.98.0"))
}
