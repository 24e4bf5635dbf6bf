//! vstream's end-to-end tests, in one test binary: each file here (a module)
//! drives the real `vstream` binary, its CLI and real clients, as the test
//! files of `tests/` did one binary each. One binary is one link instead of
//! 22, and libtest runs the files' tests side by side, so a test that mostly
//! waits (a guest boot, an idle minute) no longer holds the whole run up.
//!
//! Tests of different files share this process: what must be unique per
//! test (ports, network namespaces, LANs) comes from per-process counters in
//! `common`, never from the process id alone. Run one file's tests with a
//! filter: `cargo test -p vstream --test e2e -- netboot::`.

mod common;

mod access;
mod admin_tokens;
mod bad_input;
mod big_vdisk;
mod boots;
mod bootsets;
mod compat;
mod console;
mod data_safety;
mod datapath;
mod dead_peers;
mod durability;
mod exhaustion;
mod farm;
mod full_disk;
mod guest_boot;
mod iscsi;
mod iscsi_guest;
mod login_limits;
mod modes;
mod nbd_clients;
mod netboot;
mod power_loss;
mod reboot;
mod replication;
mod restart;
mod sanboot;
mod schema;
mod store_folders;
mod tls;
mod version_crash;
mod versions;
