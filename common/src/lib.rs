//! Helpers shared by the Causeway site daemon (`causeway`) and the
//! rendezvous (`causeway-nat`):
//!
//! - [`keys`]: WireGuard keys, their `wg genkey` / `wg pubkey` text form and
//!   private key files.
//! - [`problems`]: collecting every problem of a configuration file at
//!   once, each naming the file and the field at fault.
//! - [`fs`]: replacing a file atomically.
//!
//! It holds no protocol, no network code and no configuration schema: those
//! live in the crates that use it.

pub mod fs;
pub mod keys;
pub mod problems;
