#![no_std]

// This file exists to enable the library target (tracer-user build-depends on this crate so
// that cargo rebuilds the agent when the kernel programs change).
