//! Helpers for tests that need KVM (here and in the other crates' tests).

use kvm_ioctls::Kvm;

/// Whether this run insists on KVM (`FERRY_REQUIRE_KVM=1`, set by CI where /dev/kvm exists):
/// a test that would skip for want of KVM fails instead, so a machine that lost KVM cannot pass.
pub fn kvm_required() -> bool {
    std::env::var("FERRY_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Opens KVM for `test`, or says loudly that the test is skipped (and fails it when KVM is
/// required).
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            assert!(!kvm_required(), "{test}: FERRY_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            eprintln!("SKIPPED {test}: needs /dev/kvm: {e}");
            None
        }
    }
}
