//! Empty library target: lets `monitor` name this crate as a build-dependency, so Cargo
//! rebuilds the agent when the kernel programs change.
#![no_std]
