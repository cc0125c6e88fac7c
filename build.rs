// Records the target triple so `tether-agent --arch` can say what it was built for, and the
// date after which the device's clock counts as set (src/trust/request.rs, CLOCK_SANE_AFTER).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=TETHER_TARGET={target}");
    // The build's date when the build says it reproducibly (Yocto and Debian set
    // SOURCE_DATE_EPOCH); never earlier than the date this code was written.
    const WRITTEN: u64 = 1_796_342_400; // 2026-12-04
    let source_date = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse::<u64>().ok());
    let sane_after = source_date.unwrap_or(0).max(WRITTEN);
    println!("cargo:rustc-env=TETHER_CLOCK_SANE_AFTER={sane_after}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
}
