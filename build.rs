// Records the target triple so `tether-agent --arch` can say what it was built for, the date
// after which the device's clock counts as set (src/trust/request.rs, CLOCK_SANE_AFTER), and the
// version.
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
    // The version the agent reports: a packager's (Yocto's PV, say "1.4.0+git3") when given.
    let version = std::env::var("TETHER_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rustc-env=TETHER_VERSION={}", version.trim());
    println!("cargo:rerun-if-env-changed=TETHER_VERSION");
    // Builds that fail on purpose, for the self-update tests (tests/self_update.rs): a release
    // build never sets it, and then no such code is compiled in.
    println!("cargo::rustc-check-cfg=cfg(tether_fault, values(\"crash_at_start\", \"no_connect\", \"hang_after_connect\"))");
    if let Ok(fault) = std::env::var("TETHER_FAULT") {
        if !fault.is_empty() {
            println!("cargo:rustc-cfg=tether_fault=\"{fault}\"");
        }
    }
    println!("cargo:rerun-if-env-changed=TETHER_FAULT");
    println!("cargo:rerun-if-changed=build.rs");
}
