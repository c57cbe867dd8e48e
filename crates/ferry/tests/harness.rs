//! The end-to-end harness's own rule for KVM: a test that needs it skips loudly without it, and
//! fails instead when `FERRY_REQUIRE_KVM=1`. No KVM needed (the device is a parameter).
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

#[test]
#[should_panic(expected = "FERRY_REQUIRE_KVM=1 but /nonexistent/kvm cannot be opened: No such file or directory")]
fn a_kvm_device_that_cannot_be_opened_fails_the_test_when_kvm_is_required() {
    kvm_device_usable("t", Path::new("/nonexistent/kvm"), true);
}

#[test]
fn a_kvm_device_that_cannot_be_opened_skips_the_test_when_kvm_is_not_required() {
    let usable = kvm_device_usable("t", Path::new("/nonexistent/kvm"), false);

    assert!(!usable);
}

#[test]
fn a_kvm_device_that_opens_is_usable_whether_required_or_not() {
    // /dev/null opens read-write, as /dev/kvm does where KVM works.
    let usable = [true, false].map(|required| kvm_device_usable("t", Path::new("/dev/null"), required));

    assert_eq!(usable, [true, true]);
}

#[test]
fn only_ferry_require_kvm_1_requires_kvm() {
    let required = [None, Some(""), Some("0"), Some("1")].map(|v| kvm_required(v.map(OsStr::new)));

    assert_eq!(required, [false, false, false, true]);
}

#[test]
#[should_panic(expected = "FERRY_REQUIRE_KVM must be 0 or 1, not Some(\"yes\")")]
fn any_other_ferry_require_kvm_value_is_refused() {
    kvm_required(Some(OsStr::new("yes")));
}
