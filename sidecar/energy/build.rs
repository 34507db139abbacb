//! Hands the target triple to the tests, which compile a stand-in NVML library with `cc`.
fn main() {
    for var in ["TARGET", "HOST"] {
        if let Ok(value) = std::env::var(var) {
            println!("cargo:rustc-env=TTC_ENERGY_BUILD_{var}={value}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
