//! Network boot: what a diskless device needs before `vstream target` runs.
//!
//! - [`tftp`]: a small TFTP server (RFC 1350 with the blksize, tsize and timeout
//!   options) that serves the iPXE binaries from a boot folder and nothing outside it.
//! - [`proxy_dhcp`]: a ProxyDHCP service beside an existing DHCP server. It answers
//!   PXE clients only: firmware gets the iPXE binary for its architecture, iPXE gets
//!   the URL of its HTTP bootstrap script.
//! - [`ipxe`]: the bootstrap script served at `/boot/ipxe`.

pub mod ipxe;
pub mod proxy_dhcp;
pub mod tftp;
