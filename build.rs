// Records the target triple so `tether-agent --arch` can say what it was built for.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=TETHER_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
