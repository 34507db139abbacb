//! Builds the stand-in NVML library (tests/fake_nvml/fake_nvml.c) with `cc` and writes its
//! script, one copy per test so that parallel tests do not share the library's state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Compiles the library once per test binary; returns its path.
fn compiled() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake_nvml");
        std::fs::create_dir_all(&dir).expect("create fake NVML build dir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_nvml/fake_nvml.c");
        let out = dir.join(format!("libfake_nvml_{}.so", std::process::id()));
        let compiler = cc::Build::new()
            .target(env!("TTC_ENERGY_BUILD_TARGET"))
            .host(env!("TTC_ENERGY_BUILD_HOST"))
            .opt_level(1)
            .cargo_metadata(false)
            .cargo_warnings(false)
            .get_compiler();
        let status = Command::new(compiler.path())
            .args(compiler.args())
            .args(["-shared", "-fPIC", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-lpthread")
            .status()
            .expect("run the C compiler");
        assert!(status.success(), "compiling {} failed", src.display());
        out
    })
}

/// A private copy of the library in `dir` with the given script; returns the library's path.
#[allow(dead_code)]
pub fn fake_nvml(dir: &Path, script: &str) -> PathBuf {
    let lib = dir.join("libnvidia-ml-fake.so");
    std::fs::copy(compiled(), &lib).expect("copy fake NVML");
    std::fs::write(dir.join("libnvidia-ml-fake.so.script"), script).expect("write script");
    lib
}
