//! The kernel programs on crafted frames through `BPF_PROG_TEST_RUN` (root, no network
//! namespace): each test loads its own copy of the object with `tests::kernel_harness`.
//! One binary, so that the `monitor` library is linked once for them.

mod kernel;
mod kernel_dns;
mod kernel_fuzz;
mod kernel_hello;
mod kernel_parallel;
