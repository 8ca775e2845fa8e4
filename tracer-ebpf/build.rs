use which::which;

/// The kernel object is linked by `bpf-linker`, which cargo does not know about; rebuild when the
/// linker binary changes so a reinstalled linker is picked up.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found on PATH ({err}); run `cargo xtask setup`")
        }
    }
}
